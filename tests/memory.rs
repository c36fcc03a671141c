//! Request plaintexts (data keys) do not outlive their calls in the server's memory: after
//! 1,500 Encrypt and Decrypt calls have finished and their connections have closed, a scan of
//! the live server's writable memory (`/proc/PID/mem`, which needs root) finds none of 50
//! distinctive plaintexts, while it finds the positive controls: the primary KEK once (its
//! locked page) and a marker the server keeps on purpose (its socket path). The KEK and the
//! root key appear at most once in any form (raw, or XORed with an HMAC pad).
//!
//! Runs as root (CI does); otherwise SKIPPED, or a failure when LOCALKMS_REQUIRE_ROOT is set.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use common::{client, Workspace};
use localkms::proto::v2::{DecryptRequest, EncryptRequest};

/// Every writable mapping of `pid`, read whole (a region that cannot be read is skipped).
fn writable_memory(pid: u32) -> Vec<Vec<u8>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    let mut regions = Vec::new();
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let mut buf = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_ok() && mem.read_exact(&mut buf).is_ok() {
            regions.push(buf);
        }
    }
    regions
}

/// How many times each needle occurs in `regions`.
fn occurrences(regions: &[Vec<u8>], needles: &[Vec<u8>]) -> Vec<usize> {
    let mut first = [false; 256];
    for n in needles {
        first[usize::from(n[0])] = true;
    }
    let mut counts = vec![0usize; needles.len()];
    for r in regions {
        for i in 0..r.len() {
            if !first[usize::from(r[i])] {
                continue;
            }
            for (k, n) in needles.iter().enumerate() {
                if r[i..].starts_with(n) {
                    counts[k] += 1;
                }
            }
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn request_plaintexts_do_not_outlive_their_calls_in_server_memory() {
    if !common::root_or_skip("reading another process's memory through /proc/PID/mem") {
        return;
    }
    let ws = Workspace::new();
    // The marker the server keeps on purpose: a random name in its socket path.
    let mut marker_bytes = [0u8; 12];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut marker_bytes))
        .expect("random");
    let marker: String = marker_bytes.iter().map(|b| format!("{b:02x}")).collect();
    let socket = ws.dir.path().join(format!("m{marker}.sock"));
    let mut cmd = std::process::Command::new(common::bin());
    cmd.arg("serve")
        .arg("--socket")
        .arg(&socket)
        .args(ws.keystore_args());
    let server = common::Server::spawn(cmd, socket.clone(), ws.dir.path().join("mem.log"));
    let ep = server.endpoint();

    let mut random = std::fs::File::open("/dev/urandom").expect("urandom");
    let plaintexts: Vec<Vec<u8>> = (0..50)
        .map(|_| {
            let mut p = vec![0u8; 32];
            random.read_exact(&mut p).expect("random");
            p
        })
        .collect();
    // 1,500 calls: each plaintext encrypted and decrypted 15 times, on fresh connections.
    for round in 0..15 {
        let mut c = client(&ep).await.expect("connect");
        for p in &plaintexts {
            let e = c
                .encrypt(EncryptRequest {
                    plaintext: p.clone(),
                    uid: format!("mem-{round}"),
                })
                .await
                .expect("encrypt")
                .into_inner();
            let d = c
                .decrypt(DecryptRequest {
                    ciphertext: e.ciphertext,
                    uid: format!("mem-{round}"),
                    key_id: e.key_id,
                    annotations: Default::default(),
                })
                .await
                .expect("decrypt")
                .into_inner();
            assert_eq!(&d.plaintext, p);
        }
        drop(c);
    }
    // Let the connections close on the server's side.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let store = localkms::keystore::Store::open(
        &localkms::keystore::KeystoreLocation::file(ws.keystore.clone()),
        &Default::default(),
    )
    .expect("store");
    let root = localkms::keystore::RootKeyProvider::open(
        &localkms::keystore::RootKeySource::KeyFile(ws.root_key.clone()),
    )
    .expect("root key");
    let ks = store.load(&root).await.expect("keystore");
    let kek = ks
        .primary()
        .and_then(|p| p.material.as_ref())
        .map(|m| m.expose().to_vec())
        .expect("primary material");

    // The root key file holds the 32 raw bytes (`init` writes them so).
    let root_key = std::fs::read(&ws.root_key).expect("root key");
    assert_eq!(root_key.len(), 32);
    let xored = |key: &[u8], pad: u8| key.iter().map(|b| b ^ pad).collect::<Vec<u8>>();

    let regions = writable_memory(server.child.id());
    let mut needles = plaintexts.clone();
    // After the 50 plaintexts: the KEK raw and XORed with each HMAC pad, the root key raw and
    // XORed, and the marker.
    needles.extend([
        kek.clone(),
        xored(&kek, 0x36),
        xored(&kek, 0x5c),
        root_key.clone(),
        xored(&root_key, 0x36),
        xored(&root_key, 0x5c),
        marker.into_bytes(),
    ]);
    let counts = occurrences(&regions, &needles);
    let (plain_seen, controls) = counts.split_at(plaintexts.len());
    let [kek_raw, kek_ipad, kek_opad, root_raw, root_ipad, root_opad, marker_seen] = controls
    else {
        panic!("seven controls");
    };
    assert!(
        *marker_seen >= 1,
        "the scan must find the marker the server keeps"
    );
    assert_eq!(*kek_raw, 1, "the KEK once, in its locked page");
    assert_eq!(
        kek_ipad + kek_opad,
        0,
        "no copy of the KEK XORed with an HMAC pad outside its page"
    );
    assert!(
        root_raw + root_ipad + root_opad <= 1,
        "the root key at most once, in any form ({root_raw} raw, {root_ipad} + {root_opad} XORed)"
    );
    let found = plain_seen.iter().filter(|n| **n > 0).count();
    assert_eq!(
        found, 0,
        "{found} of 50 request plaintexts are still in the server's memory after their calls"
    );
}
