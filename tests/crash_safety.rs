//! Crash safety: mutating commands killed with SIGKILL at random moments, hundreds of times,
//! never lose a KEK, never leave an unreadable keystore, and never block the next command.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, Workspace};
use localkms::keystore::{self, KeyState, RootKeyProvider, RootKeySource};

/// A small deterministic-per-seed generator; the seed is printed so a failure can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// id → (state, material fingerprint) as loaded from disk.
fn snapshot(
    ws: &Workspace,
    root: &RootKeyProvider,
) -> HashMap<String, (KeyState, Option<[u8; 32]>)> {
    let ks = keystore::load(&ws.keystore, root).expect("keystore must always load after a kill");
    ks.records()
        .iter()
        .map(|r| {
            (
                r.id.to_string(),
                (r.state, r.material.as_ref().map(|k| *k.expose())),
            )
        })
        .collect()
}

fn pick(
    keys: &HashMap<String, (KeyState, Option<[u8; 32]>)>,
    state: KeyState,
    rng: &mut XorShift,
) -> Option<String> {
    let mut ids: Vec<&String> = keys
        .iter()
        .filter(|(_, v)| v.0 == state)
        .map(|(k, _)| k)
        .collect();
    ids.sort();
    if ids.is_empty() {
        None
    } else {
        Some(ids[(rng.next() % ids.len() as u64) as usize].clone())
    }
}

fn args_for(
    keys: &HashMap<String, (KeyState, Option<[u8; 32]>)>,
    rng: &mut XorShift,
) -> Vec<String> {
    let choice = rng.next() % 6;
    let by_state = |s, rng: &mut XorShift| pick(keys, s, rng);
    let (verb, id, extra): (&str, Option<String>, Option<&str>) = match choice {
        0 => ("rotate", None, None),
        1 => ("rotate", None, Some("--stage")),
        2 => match by_state(KeyState::Staged, rng).or_else(|| by_state(KeyState::Retired, rng)) {
            Some(id) => ("promote", Some(id), None),
            None => ("rotate", None, None),
        },
        3 => match by_state(KeyState::Retired, rng) {
            Some(id) => ("disable", Some(id), None),
            None => ("rotate", None, Some("--stage")),
        },
        4 => match by_state(KeyState::Disabled, rng) {
            Some(id) => ("enable", Some(id), None),
            None => ("rotate", None, None),
        },
        _ => match by_state(KeyState::Disabled, rng) {
            Some(id) => ("destroy", Some(id), Some("--force")),
            None => ("rotate", None, Some("--stage")),
        },
    };
    let mut args = vec!["keys".to_owned(), verb.to_owned()];
    args.extend(id);
    args.extend(extra.map(str::to_owned));
    args
}

#[test]
fn sigkill_at_random_moments_never_loses_a_kek() {
    let ws = Workspace::new();
    let root = RootKeyProvider::open(&RootKeySource::KeyFile(ws.root_key.clone())).expect("root");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("crash-safety seed {seed:#x}");
    let mut rng = XorShift(seed);

    // How long one uninterrupted rotate takes here; kills land anywhere inside that window.
    let t = Instant::now();
    for _ in 0..3 {
        assert!(ws.keys(&["rotate"]).status.success());
    }
    let window_us = (t.elapsed().as_micros() / 3).max(1000) as u64 * 3 / 2;

    let mut known = snapshot(&ws, &root);
    let mut killed = 0;
    let mut killed_mid_write = 0;
    let iterations = 300;
    for i in 0..iterations {
        let args = args_for(&known, &mut rng);
        let mut child = Command::new(bin())
            .args(&args)
            .args(ws.keystore_args())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_micros(rng.next() % window_us));
        if child.try_wait().expect("try_wait").is_none() {
            let _ = child.kill();
            killed += 1;
        }
        let _ = child.wait();

        let mid_write = std::fs::read_dir(ws.dir.path())
            .expect("readdir")
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"));
        if mid_write {
            killed_mid_write += 1;
        }
        let now = snapshot(&ws, &root);
        for (id, (state, material)) in &known {
            let (new_state, new_material) = now
                .get(id)
                .unwrap_or_else(|| panic!("iteration {i} ({args:?}): KEK {id} was lost"));
            if *new_state != KeyState::Destroyed {
                assert_eq!(
                    new_material, material,
                    "iteration {i}: KEK {id} changed its material"
                );
            } else {
                assert!(
                    *state == KeyState::Destroyed || args[1] == "destroy",
                    "iteration {i}: {id} destroyed by {args:?}"
                );
            }
        }
        let primaries = now.values().filter(|v| v.0 == KeyState::Primary).count();
        assert_eq!(primaries, 1, "iteration {i}: exactly one primary");
        known = now;

        // Nothing a dead command left behind blocks the next one.
        if i % 25 == 0 {
            let start = Instant::now();
            let out = ws.keys(&["rotate", "--stage"]);
            assert!(
                out.status.success(),
                "iteration {i}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                start.elapsed() < Duration::from_secs(9),
                "a stale lock slowed the next command"
            );
            known = snapshot(&ws, &root);
        }
    }
    eprintln!("{killed} of {iterations} commands killed; {killed_mid_write} left a temp file (killed mid-write)");
    assert!(
        killed >= iterations / 4,
        "only {killed} of {iterations} commands were killed mid-run"
    );

    // A final command cleans any temp file a killed writer left, and backups are kept.
    assert!(ws.keys(&["rotate"]).status.success());
    let names: Vec<String> = std::fs::read_dir(ws.dir.path())
        .expect("readdir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.ends_with(".tmp")),
        "temp files left: {names:?}"
    );
    let backups = names.iter().filter(|n| n.contains(".bak.")).count();
    assert_eq!(backups, keystore::file::BACKUPS_KEPT, "{names:?}");
}
