//! A real etcd for the tests that need one: members on loopback ports, and a node (root key
//! and scratch directory) that runs `localkms` commands and servers against it.
//!
//! Needs the `etcd` binary (Debian: `apt-get install etcd-server`; `.ci/run` installs it).
//! When it is missing the tests say so and pass, unless LOCALKMS_REQUIRE_ETCD is set (CI sets
//! it), in which case they fail.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{bin, free_port, Server};
use localkms::keystore::EtcdTarget;

pub fn etcd_available() -> bool {
    let found = Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("LOCALKMS_REQUIRE_ETCD").is_none(),
            "LOCALKMS_REQUIRE_ETCD is set but there is no etcd binary: apt-get install -y etcd-server"
        );
        eprintln!("SKIPPED: no etcd binary (apt-get install -y etcd-server); set LOCALKMS_REQUIRE_ETCD=1 to make this a failure");
    }
    found
}

/// A library etcd client on `url`'s (plaintext, loopback) etcd, for writing what a hostile
/// writer would.
pub fn raw_etcd(url: &str) -> (EtcdTarget, localkms::keystore::backend::etcd::Etcd) {
    let target = EtcdTarget::parse(url).expect("target");
    let etcd = localkms::keystore::backend::etcd::Etcd::connect(
        &target,
        &localkms::keystore::EtcdTls {
            insecure: true,
            ..Default::default()
        },
    )
    .expect("etcd");
    (target, etcd)
}

/// One etcd member on loopback ports.
pub struct Member {
    pub name: String,
    pub client: u16,
    pub peer: u16,
    pub dir: PathBuf,
    /// Directory with ca.crt, server.crt and server.key: serve clients over TLS and require
    /// client certificates, as a control plane's etcd does.
    pub tls: Option<PathBuf>,
    pub child: Option<Child>,
}

/// A real etcd cluster of one or more members.
pub struct Etcd {
    pub _tmp: tempfile::TempDir,
    pub members: Vec<Member>,
}

impl Etcd {
    pub fn start(n: usize) -> Etcd {
        Self::start_with(n, None)
    }

    pub fn start_with(n: usize, tls: Option<&Path>) -> Etcd {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                dir: tmp.path().join(format!("m{i}")),
                tls: tls.map(Path::to_owned),
                child: None,
            })
            .collect();
        let cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.child = Some(spawn_member(m, &cluster, tmp.path()));
        }
        let etcd = Etcd { _tmp: tmp, members };
        etcd.wait_healthy();
        etcd
    }

    pub fn url(&self, prefix: &str) -> String {
        let hosts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect();
        format!("etcd://{}/{prefix}", hosts.join(","))
    }

    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for m in &self.members {
            loop {
                let ok = std::net::TcpStream::connect(("127.0.0.1", m.client)).is_ok();
                if ok {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd member {} did not start",
                    m.name
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self, i: usize) {
        let cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let log_dir = self.members[i].dir.parent().expect("parent").to_owned();
        let child = spawn_member(&self.members[i], &cluster, &log_dir);
        self.members[i].child = Some(child);
        self.wait_healthy();
    }
}

pub fn spawn_member(m: &Member, cluster: &str, log_dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_dir.join(format!("{}.log", m.name)))
        .expect("log");
    let scheme = if m.tls.is_some() { "https" } else { "http" };
    let mut cmd = Command::new("etcd");
    if let Some(certs) = &m.tls {
        cmd.arg("--cert-file")
            .arg(certs.join("server.crt"))
            .arg("--key-file")
            .arg(certs.join("server.key"))
            .arg("--trusted-ca-file")
            .arg(certs.join("ca.crt"))
            .arg("--client-cert-auth");
    }
    cmd.arg("--name")
        .arg(&m.name)
        .arg("--data-dir")
        .arg(&m.dir)
        .arg("--listen-client-urls")
        .arg(format!("{scheme}://127.0.0.1:{}", m.client))
        .arg("--advertise-client-urls")
        .arg(format!("{scheme}://127.0.0.1:{}", m.client))
        .arg("--listen-peer-urls")
        .arg(format!("http://127.0.0.1:{}", m.peer))
        .arg("--initial-advertise-peer-urls")
        .arg(format!("http://127.0.0.1:{}", m.peer))
        .arg("--initial-cluster")
        .arg(cluster)
        .arg("--initial-cluster-state")
        .arg("new")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn etcd")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
    }
}

/// A root key and a scratch directory for servers' sockets and caches.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub root_key: PathBuf,
}

impl Node {
    pub fn new() -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let root_key = dir.path().join("root.key");
        Node { dir, root_key }
    }

    pub fn args<'a>(&'a self, url: &'a str) -> Vec<&'a str> {
        vec![
            "--keystore",
            url,
            "--root-key-file",
            self.root_key.to_str().expect("utf8"),
        ]
    }

    /// `localkms CMD` against the plaintext loopback etcd these tests run.
    pub fn run(&self, url: &str, cmd: &[&str]) -> Output {
        self.run_bin(Path::new(bin()), url, cmd)
    }

    /// As [`Node::run`], with another build of localkms (an older release).
    pub fn run_bin(&self, program: &Path, url: &str, cmd: &[&str]) -> Output {
        Command::new(program)
            .args(cmd)
            .args(self.args(url))
            .arg("--etcd-insecure")
            .env_remove("LOCALKMS_SOCKET")
            .env_remove("LOCALKMS_KEYSTORE")
            .env_remove("LOCALKMS_ROOT_KEY_FILE")
            .output()
            .expect("run localkms")
    }

    /// `localkms serve` as node `name`, with its own socket and cache directory.
    pub fn serve(&self, url: &str, name: &str, extra: &[&str]) -> Server {
        self.serve_bin(Path::new(bin()), url, name, extra)
    }

    /// The command [`Node::serve_bin`] runs (to run it without waiting for it to serve).
    pub fn serve_command(&self, program: &Path, url: &str, name: &str, extra: &[&str]) -> Command {
        let socket = self.socket(name);
        let mut cmd = Command::new(program);
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(self.args(url))
            .arg("--etcd-insecure")
            .arg("--cache-dir")
            .arg(self.dir.path().join(format!("cache-{name}")))
            .args(["--node-name", name])
            .args(extra);
        cmd
    }

    /// As [`Node::serve`], with another build of localkms (an older release).
    pub fn serve_bin(&self, program: &Path, url: &str, name: &str, extra: &[&str]) -> Server {
        let cmd = self.serve_command(program, url, name, extra);
        Server::spawn(
            cmd,
            self.socket(name),
            self.dir.path().join(format!("{name}.log")),
        )
    }

    /// Node `name`'s socket.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }
}

/// A one-member etcd with a keystore initialised under `prefix`, and a node to drive it.
pub fn initialised(prefix: &str) -> (Etcd, String, Node) {
    let etcd = Etcd::start(1);
    let url = etcd.url(prefix);
    let node = Node::new();
    ok(&node.run(&url, &["init"]));
    (etcd, url, node)
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
