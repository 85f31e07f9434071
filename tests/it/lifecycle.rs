//! Starting, refusing a second daemon, replacing a stale socket, stopping.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use paraphym_daemon::synth::Arch;
use paraphym_protocol::client::{Client, ClientError, Piece};
use paraphym_protocol::message::{ErrorKind, Generate, Options, Prompt, Request, Response};
use paraphym_tests::{bin, tiny, wait_until, TempDir, TestDaemon};

fn long_generation(model: &str) -> Generate {
    Generate {
        model: Some(model.to_owned()),
        prompt: Prompt::Raw("A very long story".into()),
        options: Options {
            max_tokens: Some(4000),
            ..Options::default()
        },
        keep_alive_ms: None,
        session: None,
    }
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn default_socket_is_private_and_carries_the_protocol_version() {
    let runtime = TempDir::new("rt");
    let mut child = Command::new(bin("paraphymd"))
        .arg("--log-file")
        .arg(runtime.path().join("log"))
        .env("XDG_RUNTIME_DIR", runtime.path())
        .env_remove("PARAPHYM_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let dir = runtime
        .path()
        .join(format!("paraphym-v{}", paraphym_protocol::PROTOCOL_VERSION));
    let socket = dir.join("paraphymd.sock");
    let up = wait_until(Duration::from_secs(20), || Client::connect(&socket).is_ok());
    let modes = (mode(&dir), if up { mode(&socket) } else { 0 });
    let _ = child.kill();
    let _ = child.wait();
    assert!(up, "listening on {}", socket.display());
    assert_eq!(modes, (0o700, 0o600));
}

#[test]
fn a_second_daemon_is_refused_and_a_stale_socket_is_replaced() {
    let daemon = TestDaemon::start(&[]);
    let second = Command::new(bin("paraphymd"))
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("--log-file")
        .arg(daemon.dir.path().join("second.log"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already running"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    // The first one still answers.
    assert!(matches!(
        daemon.client().call(Request::Health).unwrap(),
        Response::Health(h) if h.ok
    ));

    // A socket file nobody listens on (a crashed daemon's) is replaced.
    let dir = TempDir::new("stale");
    let path = dir.path().join("d.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    assert!(matches!(
        Client::connect(&path),
        Err(ClientError::NotRunning { .. })
    ));
    let mut child = Command::new(bin("paraphymd"))
        .arg("--socket")
        .arg(&path)
        .arg("--log-file")
        .arg(dir.path().join("log"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = wait_until(Duration::from_secs(20), || Client::connect(&path).is_ok());
    let _ = child.kill();
    let _ = child.wait();
    assert!(up);
}

/// In-flight requests end with Error(ShuttingDown), the socket file goes,
/// the process exits 0.
fn stops_cleanly(how: &str) {
    let model = tiny(Arch::Qwen3);
    let mut daemon = TestDaemon::start(&[]);
    let client = daemon.client();
    let mut stream = client
        .generate(long_generation(model.to_str().unwrap()))
        .unwrap();
    assert!(matches!(
        paraphym_tests::next_piece(&mut stream),
        Some(Ok(Piece::Token(_)))
    ));
    match how {
        "shutdown" => {
            let out = daemon.cli(&["stop"]);
            assert!(out.status.success(), "{out:?}");
        }
        sig => daemon.signal(sig),
    }
    let last = stream
        .find(|p| !matches!(p, Ok(Piece::Token(_) | Piece::Stage(_))))
        .expect("a final frame");
    match last {
        Err(ClientError::Daemon(e)) => assert_eq!(e.kind, ErrorKind::ShuttingDown),
        other => panic!("expected ShuttingDown, got {other:?}"),
    }
    let status = daemon.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(status.success(), "{status:?}");
    assert!(!daemon.socket.exists(), "the socket file is removed");
    assert!(daemon.log_text().contains("stopped"));
}

#[test]
fn sigterm_stops_cleanly() {
    stops_cleanly("TERM");
}

#[test]
fn sigint_stops_cleanly() {
    stops_cleanly("INT");
}

#[test]
fn the_shutdown_request_stops_cleanly() {
    stops_cleanly("shutdown");
}
