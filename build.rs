//! Compiles the KMS protos with protox (a pure-Rust protobuf compiler) so that a plain
//! `cargo build` works on a machine without `protoc`, and records the git commit and build
//! date that `localkms --version` prints (so a node's binary can be traced to its source).

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kms = [
        "proto/v2.proto",
        "proto/v2_storage.proto",
        "proto/v1beta1.proto",
    ];
    let etcd = ["proto/etcd.proto"];
    for proto in kms.iter().chain(&etcd) {
        println!("cargo:rerun-if-changed={proto}");
    }
    // The messages that carry plaintext get no derived Debug (src/lib.rs writes redacting
    // ones), so no log or panic message can ever print a DEK.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .skip_debug([
            ".v2.EncryptRequest",
            ".v2.DecryptResponse",
            ".v1beta1.EncryptRequest",
            ".v1beta1.DecryptResponse",
        ])
        .compile_fds(protox::compile(kms, ["proto"])?)?;
    // localkms is only ever an etcd client.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(protox::compile(etcd, ["proto"])?)?;
    stamp_version();
    Ok(())
}

/// Sets `LOCALKMS_GIT_COMMIT` (short hash, `+dirty` when the tree has changes, `unknown`
/// outside a git checkout) and `LOCALKMS_BUILD_DATE` (UTC, `YYYY-MM-DD`; `SOURCE_DATE_EPOCH`
/// wins for reproducible builds).
fn stamp_version() {
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/index");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(hash) if !hash.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{hash}+dirty")
            } else {
                hash
            }
        }
        _ => "unknown".to_owned(),
    };
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    println!("cargo:rustc-env=LOCALKMS_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=LOCALKMS_BUILD_DATE={y:04}-{m:02}-{d:02}");
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}
