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

/// A fresh certificate authority and a server certificate it signed, for `localhost` and
/// `127.0.0.1`, made by `openssl` in a directory: `ca.crt`, `server.crt`, `server.key`.
pub struct TestCertificates;

impl TestCertificates {
    /// Writes `ca.crt`, `ca.key`, `server.crt` and `server.key` (valid for one day) into `d`.
    pub fn make(d: &Path) {
        let openssl = find_binary("openssl", "apt-get install -y openssl");
        let run = |args: &[&str]| {
            let out = Command::new(&openssl)
                .args(args)
                .current_dir(d)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=loom-test-ca",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        )
        .expect("write ext.cnf");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ]);
    }
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

    /// Starts a server that also listens with TLS on a free port of 127.0.0.1, with a fresh CA
    /// and server certificate (see [`TestCertificates`]). Returns it, the `rediss://` URL, and
    /// the CA certificate (PEM) to trust.
    pub fn start_tls() -> (Self, String, Vec<u8>) {
        let tmp = tempfile::Builder::new()
            .prefix("loom-tls-")
            .tempdir()
            .expect("temp dir for certificates");
        let d = tmp.path();
        TestCertificates::make(d);
        let port = free_port();
        let p = |f: &str| d.join(f).display().to_string();
        let (cert, key, ca) = (p("server.crt"), p("server.key"), p("ca.crt"));
        let port_s = port.to_string();
        let server = Self::start_with(&[
            "--bind",
            "127.0.0.1",
            "--tls-port",
            &port_s,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ]);
        let ca_pem = std::fs::read(d.join("ca.crt")).expect("read the CA");
        // The certificates must outlive the server's start; it has read them by now.
        drop(tmp);
        (server, format!("rediss://localhost:{port}/"), ca_pem)
    }

    /// The server's data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log, for a failure's message (a log not written yet reads as empty).
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("redis.log")).unwrap_or_default()
    }

    /// Starts a primary and a replica of it, each in a fresh temporary directory with the
    /// settings of [`RedisServer::start`], both also on a free TCP port of 127.0.0.1 (a replica
    /// reaches its primary over TCP), and waits until the replica has synchronised. Returns
    /// (primary, replica).
    pub fn start_with_replica() -> (Self, Self) {
        let port = free_port().to_string();
        let primary = Self::start_with(&["--port", &port, "--bind", "127.0.0.1"]);
        let replica_port = free_port().to_string();
        let replica = Self::start_with(&[
            "--port",
            &replica_port,
            "--bind",
            "127.0.0.1",
            "--replicaof",
            "127.0.0.1",
            &port,
        ]);
        let started = Instant::now();
        while !info(&replica.socket(), "replication")
            .is_some_and(|i| i.contains("master_link_status:up"))
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the replica did not synchronise with its primary in 20 s; its log:\n{}",
                replica.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (primary, replica)
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
                let log = self.log();
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

    /// Stops the server's process (SIGSTOP) until [`resume`](Self::resume): a server that
    /// stalls with its connections open (a replica that stops reading its link, say).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a [`pause`](Self::pause)d server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let child = self.child.as_ref().expect("the server is running");
        let status = Command::new("kill")
            .arg(which)
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {which} redis-server: {status}");
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

/// A private Redis Cluster of three primaries (no replicas), each `redis-server
/// --cluster-enabled yes` in a temporary directory of its own, with the same durability settings
/// as [`RedisServer`], on free TCP ports of 127.0.0.1 (a cluster's nodes find each other over
/// TCP, on their port and port + 10000), joined with `redis-cli --cluster create`. Stopped when
/// dropped.
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
}

struct ClusterNode {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl RedisCluster {
    /// Starts three primaries and joins them; returns once every node says the cluster is ok.
    pub fn start() -> Self {
        let binary = find_binary("redis-server", "apt-get install -y redis-server");
        let cli = find_binary("redis-cli", "apt-get install -y redis-tools");
        let mut nodes = Vec::new();
        while nodes.len() < 3 {
            let port = free_port();
            // The cluster bus listens 10000 above.
            let bus_free =
                port <= 55_535 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok();
            if !bus_free || nodes.iter().any(|n: &ClusterNode| n.port == port) {
                continue;
            }
            let dir = tempfile::Builder::new()
                .prefix("loom-redis-cluster-")
                .tempdir()
                .expect("temp dir for a cluster node");
            let d = dir.path();
            let child = Command::new(&binary)
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .arg("--unixsocket")
                .arg(d.join("redis.sock"))
                .args(["--unixsocketperm", "700", "--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(d.join("nodes.conf"))
                .arg("--dir")
                .arg(d)
                .args([
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--save",
                    "",
                ])
                .arg("--logfile")
                .arg(d.join("redis.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start a cluster node");
            nodes.push(ClusterNode { dir, port, child });
        }
        let cluster = RedisCluster { nodes };
        let started = Instant::now();
        for n in &cluster.nodes {
            while !ping(&n.dir.path().join("redis.sock")) {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "cluster node on port {} did not come up in 20 s",
                    n.port
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new(&cli)
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        // Every node must agree before the cluster takes a command for any slot.
        for n in &cluster.nodes {
            loop {
                let info = Command::new(&cli)
                    .arg("-s")
                    .arg(n.dir.path().join("redis.sock"))
                    .args(["cluster", "info"])
                    .output()
                    .expect("run redis-cli cluster info");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "the cluster on {addresses:?} is not ok after 60 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    /// The nodes' URLs (`redis://127.0.0.1:<port>/`), any of which a cluster client starts
    /// from.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
            .collect()
    }

    /// The cluster as a Loom store URL: `redis+cluster://127.0.0.1:<port>,…/`.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}/", nodes.join(","))
    }
}

impl Drop for ClusterNode {
    // Each node on its own, so that the nodes started before a later one failed are stopped
    // too.
    fn drop(&mut self) {
        // Already exited is fine: the point is that it is not running.
        let _ = self.child.kill();
        // Reaping can only fail if it was reaped already.
        let _ = self.child.wait();
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local address").port()
}

/// True if a Redis server answers PING on `socket`.
fn ping(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    if s.set_read_timeout(Some(Duration::from_millis(500)))
        .is_err()
    {
        // Without a timeout the read below could block for ever; count it as not answering.
        return false;
    }
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    // "+PONG", or "-NOAUTH …" from a server that wants a password: either way, it is up and
    // has loaded its data ("-LOADING …" means it is still replaying its append-only file).
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && (&buf == b"+PONG\r\n" || &buf == b"-NOAUTH")
}

/// The text of `INFO <section>` from the server on `socket`, or `None` if it does not answer.
fn info(socket: &Path, section: &str) -> Option<String> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(format!("INFO {section}\r\n").as_bytes()).ok()?;
    // A bulk string: "$<length>\r\n<text>\r\n".
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        s.read_exact(&mut byte).ok()?;
        head.push(byte[0]);
    }
    let len: usize = std::str::from_utf8(head.strip_prefix(b"$")?)
        .ok()?
        .trim_end()
        .parse()
        .ok()?;
    let mut text = vec![0u8; len];
    s.read_exact(&mut text).ok()?;
    String::from_utf8(text).ok()
}

/// A private PostgreSQL cluster: `initdb` into a temporary directory, a unix socket there, its
/// own port, no TCP listener. As root (PostgreSQL refuses to run as root), its processes run as
/// the `postgres` user, which owns the directory.
pub struct PostgresServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    running: bool,
    settings: Vec<String>,
}

fn postgres_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("initdb").is_file())
                .collect()
        })
        .unwrap_or_default();
    // The newest major version first (directories are named by it).
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(d) = dirs.pop() {
        return d;
    }
    find_binary("initdb", "apt-get install -y postgresql")
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

impl PostgresServer {
    /// Creates and starts a cluster (`fsync = on`, `synchronous_commit = on`).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Creates and starts a cluster with extra `name=value` settings (after the defaults, so
    /// they win), as in `start_with(&["fsync=off"])`.
    pub fn start_with(settings: &[&str]) -> Self {
        let mut s = Self::create(settings);
        s.launch();
        s
    }

    /// Starts a cluster that also listens on a free port of 127.0.0.1, where it takes only TLS
    /// connections (certificate from a fresh CA, see [`TestCertificates`]) authenticated by
    /// SCRAM password. Returns it, a URL for the role `loom` whose password needs
    /// percent-encoding (`s3cret/with:odd@chars`) that requires the certificate to be valid
    /// for the host (`sslmode=verify-full` with the CA as `sslrootcert`), and the CA's path.
    pub fn start_tls() -> (Self, String, PathBuf) {
        let tls = tempfile::Builder::new()
            .prefix("loom-pg-tls-")
            .tempdir()
            .expect("temp dir for certificates");
        TestCertificates::make(tls.path());
        let mut s = Self::create(&[]);
        let port = s.port;
        let tls_dir = s.dir.path().join("tls");
        std::fs::create_dir(&tls_dir).expect("create the certificate directory");
        for f in ["ca.crt", "server.crt", "server.key"] {
            std::fs::copy(tls.path().join(f), tls_dir.join(f)).expect("copy a certificate");
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            tls_dir.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod the server key");
        s.chown();
        // First match wins: the socket stays trusted (for the set-up below), TCP without TLS
        // is refused, TCP with TLS needs the password.
        std::fs::write(
            s.data().join("pg_hba.conf"),
            "local all all trust\nhostnossl all all all reject\nhostssl all all all scram-sha-256\n",
        )
        .expect("write pg_hba.conf");
        let t = |f: &str| tls_dir.join(f).display().to_string();
        s.settings.push(format!(
            " -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file='{}' -c ssl_key_file='{}'",
            t("server.crt"),
            t("server.key")
        ));
        s.launch();
        let out = s
            .command("psql")
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(s.dir.path())
            .args([
                "-p",
                &s.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
            ])
            .arg(
                "CREATE ROLE loom LOGIN PASSWORD 's3cret/with:odd@chars'; \
                 GRANT CREATE ON DATABASE postgres TO loom;",
            )
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "creating the role failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ca = tls_dir.join("ca.crt");
        let url = format!(
            "postgres://loom:s3cret%2Fwith%3Aodd%40chars@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={}",
            ca.display()
        );
        (s, url, ca)
    }

    /// Gives the cluster directory to the `postgres` user when running as root.
    fn chown(&self) {
        if self.as_postgres {
            let ok = Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(self.dir.path())
                .status()
                .expect("chown");
            assert!(
                ok.success(),
                "chown of the cluster directory to postgres failed"
            );
        }
    }

    /// Creates a cluster (`initdb`) without starting it.
    fn create(settings: &[&str]) -> Self {
        let bin = postgres_bin();
        let dir = tempfile::Builder::new()
            .prefix("loom-pg-")
            .tempdir()
            .expect("temp dir for postgres");
        let as_postgres = is_root();
        let s = PostgresServer {
            dir,
            bin,
            port: free_port(),
            as_postgres,
            running: false,
            settings: settings.iter().map(|s| format!(" -c {s}")).collect(),
        };
        s.chown();
        let data = s.data();
        let out = s
            .command("initdb")
            .args(["-D"])
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        s
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn launch(&mut self) {
        let opts = format!(
            // pg_ctl runs this through /bin/sh: the path is quoted.
            "-p {} -k '{}' -c listen_addresses='' -c fsync=on -c synchronous_commit=on -c max_connections=200{}",
            self.port,
            self.dir.path().display(),
            self.settings.concat()
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .args(["-o", &opts, "-w", "-t", "60", "start"])
            .output()
            .expect("run pg_ctl start");
        if !out.status.success() {
            let log =
                std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
            panic!(
                "pg_ctl start failed: {}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.running = true;
    }

    /// The URL to connect to it (as the `postgres` superuser, over the unix socket).
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@localhost/postgres?host={}&port={}",
            self.dir.path().display(),
            self.port
        )
    }

    /// Stops the server with `pg_ctl stop -m immediate`: no checkpoint, no clean shutdown, as a
    /// crash would (the next start replays the write-ahead log).
    pub fn stop_immediate(&mut self) {
        if !self.running {
            return;
        }
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output()
            .expect("run pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.running = false;
    }

    /// Stops it immediately and starts it again on the same data.
    pub fn restart(&mut self) {
        self.stop_immediate();
        self.launch();
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if self.running {
            // Best effort while tearing down; the directory is removed right after.
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}
