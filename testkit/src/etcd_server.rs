//! A throw-away etcd server for tests and local experiments: the `etcd` binary (Debian's
//! `etcd-server`) on free loopback ports with a temporary data directory, stopped and removed on
//! drop. It can be stopped and started again on the same ports and data, to test surviving an etcd
//! restart. [`EtcdServer::start_tls`] runs it as production should: clients over TLS, each
//! required to present a certificate from the given CA (`--client-cert-auth`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    /// Data and log, removed when the server is dropped.
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// With TLS on the client port: its files, and a plaintext port for `/health` (which the
    /// client port only answers to a client certificate).
    tls: Option<(EtcdTls, u16)>,
}

/// The server's certificate and key, and the CA its clients' certificates must chain to (the same
/// CA is expected to have issued the server's).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Three distinct free loopback ports (client, peer, metrics): all bound at once, then let go.
fn free_ports() -> std::io::Result<[u16; 3]> {
    let listeners =
        [TcpListener::bind("127.0.0.1:0")?, TcpListener::bind("127.0.0.1:0")?, TcpListener::bind("127.0.0.1:0")?];
    let mut ports = [0; 3];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

impl EtcdServer {
    /// Starts etcd in a fresh directory under `parent` and waits until it answers (10 s at most).
    pub fn start(parent: &Path) -> std::io::Result<Self> {
        Self::start_on_free_ports(parent, None)
    }

    /// [`Self::start`] with TLS on the client port and client-certificate authentication
    /// (`--client-cert-auth --trusted-ca-file --cert-file --key-file`).
    pub fn start_tls(parent: &Path, tls: EtcdTls) -> std::io::Result<Self> {
        Self::start_on_free_ports(parent, Some(tls))
    }

    /// Ports are found free by binding port 0 and letting go, so another process (tests run in
    /// parallel) may take one before etcd binds it: then etcd exits with "address already in use"
    /// and this tries again on other ports, a few times.
    fn start_on_free_ports(parent: &Path, tls: Option<EtcdTls>) -> std::io::Result<Self> {
        const ATTEMPTS: usize = 5;
        let mut attempt = 1;
        loop {
            let dir = tempfile::Builder::new().prefix("epserve-etcd-").tempdir_in(parent)?;
            let [client_port, peer_port, metrics_port] = free_ports()?;
            let tls = tls.as_ref().map(|files| (files.clone(), metrics_port));
            let mut server = EtcdServer { child: None, dir, client_port, peer_port, tls };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) if attempt < ATTEMPTS && e.to_string().contains("address already in use") => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// `127.0.0.1:PORT`, the client endpoint.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// `etcd://127.0.0.1:PORT` (`etcds://` with TLS), as `--registry` takes it.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{}", self.endpoint())
    }

    /// Stops the server (SIGTERM, then SIGKILL after 5 s); the data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        self.spawn()
    }

    /// Starts it again on the same ports with its data wiped: every lease and key is gone, as after
    /// losing the etcd cluster.
    pub fn restart_empty(&mut self) -> std::io::Result<()> {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path().join("data"));
        self.spawn()
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.path().join("etcd.log"))?;
        let mut command = Command::new("etcd");
        if let Some((tls, metrics_port)) = &self.tls {
            command
                .args(["--client-cert-auth", "--trusted-ca-file"])
                .arg(&tls.ca)
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{metrics_port}")]);
        }
        let child = command
            .args(["--name", "epserve-test", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("epserve-test={peer}")])
            .args(["--log-level", "warn", "--logger", "zap"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("starting `etcd` (Debian package etcd-server): {e}")))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.healthy() {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
                return Err(std::io::Error::other(format!("etcd exited ({status}): {log}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(std::io::Error::other("etcd did not become healthy within 10 s"))
    }

    /// etcd's `GET /health` says `{"health":"true"}`. A blocking client without a runtime of its own,
    /// so that this works from sync tests and from inside async ones alike.
    fn healthy(&self) -> bool {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(1))).build().into();
        let port = self.tls.as_ref().map_or(self.client_port, |(_, metrics_port)| *metrics_port);
        let url = format!("http://127.0.0.1:{port}/health");
        agent
            .get(&url)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .is_some_and(|body| body.contains("\"true\""))
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        // The temporary directory removes itself after this.
        self.stop();
    }
}
