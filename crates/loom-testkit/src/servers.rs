//! Private servers for tests: each test binary starts its own, in a temporary directory, on a
//! unix socket (no TCP port at all), and stops it when done. Tests never touch a server they did
//! not start, and never flush one: each case works under its own key prefix.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Finds a server binary on `PATH` or in the usual places, or panics with the command that
/// installs it (a silent skip would let CI pass without the tests).
pub fn find_binary(name: &str, install: &str) -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    candidates.push(Path::new("/usr/bin").join(name));
    candidates.push(Path::new("/usr/local/bin").join(name));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed; install it with `{install}` (./scripts/test does this when run as root)"))
}

/// A private `redis-server`, persisting with `appendonly yes` and `appendfsync always`.
pub struct RedisServer {
    dir: tempfile::TempDir,
    binary: PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server in a fresh temporary directory.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra settings (`["--appendonly", "no"]`), which override the defaults.
    pub fn start_with(extra: &[&str]) -> Self {
        let binary = find_binary("redis-server", "apt-get install -y redis-server");
        let dir = tempfile::Builder::new()
            .prefix("loom-redis-")
            .tempdir()
            .expect("temp dir for redis");
        let mut server = RedisServer {
            dir,
            binary,
            child: None,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        server.launch();
        server
    }

    /// The socket path.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// The URL to connect to it.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    /// The server's data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn launch(&mut self) {
        let d = self.dir.path();
        let child = Command::new(&self.binary)
            .arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(self.socket())
            .arg("--unixsocketperm")
            .arg("700")
            .arg("--dir")
            .arg(d)
            .arg("--appendonly")
            .arg("yes")
            .arg("--appendfsync")
            .arg("always")
            .arg("--save")
            .arg("")
            .arg("--logfile")
            .arg(d.join("redis.log"))
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if ping(&self.socket()) {
                return;
            }
            if started.elapsed() > Duration::from_secs(20) {
                let log = std::fs::read_to_string(d.join("redis.log")).unwrap_or_default();
                panic!("redis-server did not come up in 20 s; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Already exited is fine: the point is that it is not running.
            let _ = child.kill();
            child.wait().expect("reap redis-server");
        }
        // A socket left behind by a killed server is stale; the next start makes a new one.
        let _ = std::fs::remove_file(self.socket());
    }

    /// Starts the server again on the same data (it replays its append-only file).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True if a Redis server answers PING on `socket`.
fn ping(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
