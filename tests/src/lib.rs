//! The end-to-end harness: the real `paraphymd` and `paraphym` binaries on a
//! private socket, models synthesized here (and the real Gemma file), and the
//! daemon's log printed when a test fails.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use paraphym_daemon::synth::{self, Arch, Size};
use paraphym_protocol::client::Client;
use paraphym_protocol::message::{
    ClientMsg, DaemonMsg, Generate, Options, Prompt, Request, Response, StatusReport,
};
use paraphym_protocol::{codec, frame, handshake, PROTOCOL_VERSION};

/// The folder of the binaries under test (the one this test runs from).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/it-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_owned()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The newest source file `name` is built from: its crate's library, the
/// protocol crate, and its own `src/bin` file (other binaries don't count).
fn newest_source(name: &str) -> SystemTime {
    fn walk(dir: &Path, name: &str, newest: &mut SystemTime) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "bin") {
                    walk_bin(&p, name, newest);
                } else {
                    walk(&p, name, newest);
                }
            } else if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                *newest = (*newest).max(m);
            }
        }
    }
    fn walk_bin(dir: &Path, name: &str, newest: &mut SystemTime) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            if stem == name {
                walk(&p, name, newest);
                if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                    *newest = (*newest).max(m);
                }
            }
        }
    }
    let crate_dir = if name == "paraphym" {
        "tui/src"
    } else {
        "daemon/src"
    };
    let mut newest = SystemTime::UNIX_EPOCH;
    for d in [crate_dir, "protocol/src"] {
        walk(&workspace().join(d), name, &mut newest);
    }
    newest
}

/// A binary of this workspace, refusing one older than its sources: the
/// test crate can't build other crates' binaries itself.
pub fn bin(name: &str) -> PathBuf {
    fresh(bin_dir().join(name), "cargo build --workspace --bins")
}

/// A release build of a daemon binary (what `scripts/demo.sh` runs).
pub fn release_bin(name: &str) -> PathBuf {
    let target = bin_dir().parent().expect("target").to_owned();
    fresh(
        target.join("release").join(name),
        &format!("cargo build --release -p paraphym-daemon --bin {name}"),
    )
}

fn fresh(p: PathBuf, build: &str) -> PathBuf {
    let name = p
        .file_name()
        .and_then(|n| n.to_str())
        .expect("name")
        .to_owned();
    let built = std::fs::metadata(&p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "{} is missing: run `{build}` first (scripts/test.sh does)",
                p.display()
            )
        });
    assert!(
        built >= newest_source(&name),
        "{} is older than its sources: run `{build}` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A scratch directory removed on drop. Short paths: Unix socket paths are
/// limited to about 100 bytes.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "pp-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The Gemma 3 270M Q4_K_M file. Missing it is a failure, not a skip.
pub fn gemma_path() -> PathBuf {
    synth::test_model().unwrap_or_else(|e| panic!("{e}"))
}

/// The tiny synthetic model of `arch` with its real vocabulary, written once
/// per build into the target folder.
pub fn tiny(arch: Arch) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = bin_dir().join("it-models");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("tiny-{}.gguf", arch.name()));
    if !path.is_file() {
        let tok = synth::reference_tokenizer(arch.tokenizer_family(Size::Tiny))
            .unwrap_or_else(|e| panic!("{e}"));
        let vocab = synth::Vocabulary::from_tokenizer_json(&tok, arch).unwrap();
        let tmp = path.with_extension("part");
        synth::write(arch, Size::Tiny, &vocab, 7, &tmp).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    path
}

/// Poll `f` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running `paraphymd` on a private socket; killed on drop, its log
/// printed if the test is failing.
pub struct TestDaemon {
    pub binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub dir: TempDir,
}

impl TestDaemon {
    /// Start with extra flags and wait until it accepts connections.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// [`TestDaemon::start`] with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_binary(bin("paraphymd"), args, env)
    }

    /// [`TestDaemon::start_with_env`] with another build of `paraphymd`.
    pub fn start_binary(binary: PathBuf, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = TempDir::new("d");
        let socket = dir.path().join("d.sock");
        let log = dir.path().join("paraphymd.log");
        let mut d = Self {
            binary,
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            socket,
            log,
            dir,
        };
        d.spawn();
        d
    }

    /// Kill the daemon outright (SIGKILL: no goodbye to its clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same socket, with the same flags.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.binary)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--log-file")
            .arg(&self.log)
            .args(&self.args)
            .env("PARAPHYM_LOG", "debug")
            .env_remove("PARAPHYM_MODEL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start paraphymd");
        self.child = Some(child);
        let ok = wait_until(Duration::from_secs(30), || {
            UnixStream::connect(&self.socket).is_ok()
        });
        assert!(ok, "paraphymd did not listen:\n{}", self.log_text());
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket).expect("connect")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run `paraphym` against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.socket, args, None)
    }

    /// Wait for the process to exit (after a signal or a Shutdown).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                self.child = None;
                return Some(s);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok);
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- paraphymd log ----\n{}", self.log_text());
        }
    }
}

/// Run `paraphym --socket SOCKET ARGS`, with `stdin` if given.
pub fn cli(socket: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    cli_env(socket, args, stdin, &[])
}

/// [`cli`] with extra environment variables (a daemon it starts inherits them).
pub fn cli_env(socket: &Path, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(bin("paraphym"))
        .envs(env.iter().copied())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("PARAPHYM_MODEL")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start paraphym");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    child.wait_with_output().expect("paraphym output")
}

/// The next piece of a stream that is not progress (`Stage`).
pub fn next_piece(
    s: &mut paraphym_protocol::client::TokenStream,
) -> Option<Result<paraphym_protocol::client::Piece, paraphym_protocol::client::ClientError>> {
    s.find(|p| !matches!(p, Ok(paraphym_protocol::client::Piece::Stage(_))))
}

/// A connection that speaks the protocol by hand, for the fault tests.
pub struct RawConn(pub UnixStream);

impl RawConn {
    /// Connect and shake hands.
    pub fn open(socket: &Path) -> Self {
        let mut s = UnixStream::connect(socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(&handshake::hello(PROTOCOL_VERSION)).unwrap();
        let mut answer = [0u8; 13];
        s.read_exact(&mut answer).expect("handshake answer");
        assert_eq!(answer[12], handshake::ACCEPTED);
        Self(s)
    }

    pub fn send(&mut self, id: u64, request: Request) {
        let payload = codec::encode(&ClientMsg { id, request }).unwrap();
        frame::write_frame(&mut self.0, &payload).unwrap();
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
    }

    pub fn recv(&mut self) -> Result<DaemonMsg, frame::FrameError> {
        let payload = frame::read_frame(&mut self.0)?;
        Ok(codec::decode(&payload).expect("a daemon message decodes"))
    }

    /// The next message that is not a generation's progress (`Stage`).
    pub fn answer(&mut self) -> DaemonMsg {
        loop {
            let m = self.recv().expect("a message");
            if !matches!(m.response, paraphym_protocol::message::Response::Stage(_)) {
                return m;
            }
        }
    }
}

/// A raw-prompt generation with a fixed seed that runs its full length
/// (`ignore_eos`), so tests know how many tokens come; callers adjust fields.
pub fn raw_gen(model: &str, prompt: &str, max_tokens: u32) -> Generate {
    Generate {
        model: Some(model.to_owned()),
        prompt: Prompt::Raw(prompt.to_owned()),
        options: Options {
            max_tokens: Some(max_tokens),
            seed: Some(1),
            ignore_eos: true,
            ..Options::default()
        },
        keep_alive_ms: None,
        session: None,
    }
}

/// The daemon's status report.
pub fn status(c: &Client) -> StatusReport {
    match c.call(Request::Status).expect("status") {
        Response::Status(s) => s,
        other => panic!("status answered {other:?}"),
    }
}
