//! A private PostgreSQL server for one test: `initdb` into a temporary folder,
//! `postgres` on a free loopback port, stopped and removed when dropped.
//!
//! The binaries (PostgreSQL 16 with pgvector) come from `LLAMA_RS_PG_BIN`, or
//! else from the venv that `scripts/setup/setup-postgres.sh` installs. PostgreSQL
//! refuses to run as root: under root the server runs as `nobody`, from a
//! world-readable copy of the binaries when the originals are not readable by
//! that user (the venv usually lies under `/root`).

use std::ffi::OsStr;
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// How the server's commands are run: as we are, or as another user.
#[derive(Clone, Debug)]
enum Runner {
    Direct,
    As { uid: u32, gid: u32 },
}

impl Runner {
    fn command(&self, program: &Path) -> Command {
        let mut cmd = self.bare(program);
        // The test's folder may be closed to the server's user.
        cmd.current_dir("/");
        cmd
    }

    fn bare(&self, program: &Path) -> Command {
        match self {
            Runner::Direct => Command::new(program),
            Runner::As { uid, gid } => {
                let mut cmd = Command::new("setpriv");
                cmd.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg("--")
                    .arg(program);
                cmd
            }
        }
    }
}

/// The binaries and the user to run them as, found once per test process.
struct Install {
    bin: PathBuf,
    runner: Runner,
}

fn install() -> &'static Install {
    static INSTALL: OnceLock<Install> = OnceLock::new();
    INSTALL.get_or_init(|| {
        let bin = find_bin();
        let runner = runner();
        let bin = match runner {
            Runner::Direct => bin,
            Runner::As { .. } => readable_bin(&bin, &runner),
        };
        Install { bin, runner }
    })
}

fn find_bin() -> PathBuf {
    let setup = "run scripts/setup/setup-postgres.sh (it installs PostgreSQL 16 with pgvector), \
                 or set LLAMA_RS_PG_BIN to a folder holding initdb, pg_ctl and postgres";
    if let Some(dir) = std::env::var_os("LLAMA_RS_PG_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("initdb").is_file() && dir.join("pg_ctl").is_file(),
            "LLAMA_RS_PG_BIN={} holds no initdb/pg_ctl: {setup}",
            dir.display()
        );
        return dir;
    }
    let cache = std::env::var_os("LLAMA_RS_CACHE")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/llama-rs")))
        .unwrap_or_else(|| PathBuf::from(".cache/llama-rs"));
    let venv = cache.join("pg-venv");
    let found = fs::read_dir(venv.join("lib")).ok().and_then(|entries| {
        entries
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages/pgserver/pginstall/bin"))
            .find(|bin| bin.join("initdb").is_file() && bin.join("pg_ctl").is_file())
    });
    match found {
        Some(bin) => bin,
        None => panic!(
            "PostgreSQL binaries for the tests are missing (looked in {}): {setup}",
            venv.display()
        ),
    }
}

fn id(args: &[&str]) -> u32 {
    let out = Command::new("id")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run id {args:?}: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("id {args:?} printed {:?}", out))
}

fn runner() -> Runner {
    if id(&["-u"]) != 0 {
        return Runner::Direct;
    }
    Runner::As {
        uid: id(&["-u", "nobody"]),
        gid: id(&["-g", "nobody"]),
    }
}

/// Whether `runner` can start the programs of `bin` (and so load their libraries).
fn runs(runner: &Runner, bin: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres", "createdb"]
        .iter()
        .all(|program| {
            runner
                .command(&bin.join(program))
                .arg("--version")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
}

/// Whether every folder from `/` down to `dir` lets other users through.
fn open_to_others(dir: &Path) -> bool {
    dir.ancestors().all(|d| {
        fs::metadata(d)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

/// `bin`, or a copy of its installation that `runner`'s user can read.
fn readable_bin(bin: &Path, runner: &Runner) -> PathBuf {
    // The installation root (…/pgserver/pginstall) and the folder above its
    // package, where the wheel keeps the shared libraries the binaries load
    // through an rpath relative to bin/ (…/pgserver.libs).
    let root = bin.parent().expect("bin folder has a parent");
    let package = root.parent().expect("install root has a parent");
    let site = package.parent().expect("package has a parent");
    if open_to_others(site) && runs(runner, bin) {
        return bin.to_path_buf();
    }
    let stamp = fs::metadata(bin.join("postgres"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut hasher = DefaultHasher::new();
    (bin, stamp).hash(&mut hasher);
    let copy = std::env::temp_dir().join(format!("llama-rs-pg-{:016x}", hasher.finish()));
    let rel = |p: &Path| p.strip_prefix(site).expect("under site").to_path_buf();
    let copied_bin = copy.join(rel(bin));
    if runs(runner, &copied_bin) {
        return copied_bin;
    }

    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let stage =
        std::env::temp_dir().join(format!("llama-rs-pg-stage-{}-{nanos}", std::process::id()));
    make_dir(&stage);
    make_dir(&stage.join(rel(package)));
    copy_tree(root, &stage.join(rel(root)));
    for entry in fs::read_dir(site).expect("read site folder").flatten() {
        let path = entry.path();
        let libs = path.extension() == Some(OsStr::new("libs"));
        if libs && path.is_dir() {
            copy_tree(&path, &stage.join(rel(&path)));
        }
    }
    let _ = fs::remove_dir_all(&copy);
    if fs::rename(&stage, &copy).is_err() {
        // Another test process made the same copy first.
        let _ = fs::remove_dir_all(&stage);
    }
    assert!(
        runs(runner, &copied_bin),
        "cannot run {} as {runner:?} (copied from {})",
        copied_bin.join("postgres").display(),
        bin.display()
    );
    copied_bin
}

fn make_dir(dir: &Path) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
}

/// Copies a tree, keeping symlinks, readable by everyone.
fn copy_tree(from: &Path, to: &Path) {
    make_dir(to);
    for entry in fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let entry = entry.expect("dir entry");
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let kind = entry.file_type().expect("file type");
        if kind.is_symlink() {
            let target = fs::read_link(&src).expect("read link");
            std::os::unix::fs::symlink(target, &dst).expect("make link");
        } else if kind.is_dir() {
            copy_tree(&src, &dst);
        } else {
            fs::copy(&src, &dst)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dst.display()));
            let mode = fs::metadata(&src).expect("metadata").permissions().mode();
            let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
            fs::set_permissions(&dst, fs::Permissions::from_mode(mode)).expect("chmod");
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free loopback port")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A running server; stopped and deleted on drop, also when a test panics.
pub struct PgServer {
    dir: tempfile::TempDir,
    data: PathBuf,
    started: bool,
    port: u16,
    /// `postgres://` URL of an empty database on the server.
    pub url: String,
}

impl PgServer {
    /// Starts a fresh server with an empty database.
    pub fn start() -> PgServer {
        let install = install();
        let dir = tempfile::Builder::new()
            .prefix("llama-rs-pgdata-")
            .tempdir()
            .expect("temporary folder");
        if let Runner::As { uid, gid } = install.runner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("hand the data folder to the server's user");
        }
        let data = dir.path().join("data");
        let mut server = PgServer {
            data,
            dir,
            started: false,
            port: 0,
            url: String::new(),
        };
        let out = install
            .runner
            .command(&install.bin.join("initdb"))
            .arg("-D")
            .arg(&server.data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", text(&out));

        let log = server.dir.path().join("server.log");
        let mut port = 0;
        for attempt in 0..5 {
            port = free_port();
            let options = format!(
                "-p {port} -h 127.0.0.1 -k {} -F -c max_connections=40 -c shared_buffers=16MB",
                server.dir.path().display()
            );
            let out = install
                .runner
                .command(&install.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&server.data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "-o", &options, "start"])
                .output()
                .expect("run pg_ctl start");
            server.started = true;
            if out.status.success() {
                break;
            }
            let log_text = fs::read_to_string(&log).unwrap_or_default();
            let port_taken = log_text.contains("could not bind") || log_text.contains("in use");
            assert!(
                port_taken && attempt < 4,
                "postgres did not start: {}\n{log_text}",
                text(&out)
            );
            server.stop();
        }
        server.port = port;
        server.url = server.create_database("rag");
        server
    }

    /// Creates another empty database on the server; its `postgres://` URL.
    pub fn create_database(&self, name: &str) -> String {
        let port = self.port.to_string();
        let out = Command::new(install().bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", name])
            .output()
            .expect("run createdb");
        assert!(out.status.success(), "createdb failed: {}", text(&out));
        format!("postgres://postgres@127.0.0.1:{port}/{name}")
    }

    fn stop(&mut self) {
        if !self.started {
            return;
        }
        self.started = false;
        let install = install();
        let stopped = install
            .runner
            .command(&install.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "-t", "30", "stop"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        let running = || {
            install
                .runner
                .command(&install.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("status")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        if !stopped && running() {
            // It did not stop in time: kill the postmaster.
            let pid = fs::read_to_string(self.data.join("postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().map(str::to_string));
            if let Some(pid) = pid {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}
