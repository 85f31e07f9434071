//! Finding the daemon: connect, or start one in the background and wait
//! until it answers; say clearly when a daemon of another version runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use paraphym_protocol::client::{Client, ClientError};
use paraphym_protocol::message::{Request, Response};
use paraphym_protocol::paths;

/// How long a freshly started daemon may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub fn socket_path(flag: Option<&Path>) -> Result<PathBuf, ClientError> {
    match flag {
        Some(p) => Ok(p.to_owned()),
        None => paths::default_socket().ok_or(ClientError::NoSocketPath),
    }
}

/// Connect to a running daemon only.
pub fn connect(socket: &Path) -> Result<Client, ClientError> {
    match Client::connect(socket) {
        Err(e @ ClientError::NotRunning { .. }) => {
            for other in paths::other_version_sockets(socket) {
                eprintln!(
                    "paraphym: a daemon of another protocol version has a socket at {} \
                     (this client speaks version {}); it can't serve this client",
                    other.display(),
                    paraphym_protocol::PROTOCOL_VERSION
                );
            }
            Err(e)
        }
        other => other,
    }
}

/// Connect, starting the daemon first if none runs.
pub fn connect_or_start(socket: &Path, explicit_socket: bool) -> Result<Client, ClientError> {
    match Client::connect(socket) {
        Err(ClientError::NotRunning { .. }) => {}
        other => return other,
    }
    let exe = daemon_binary();
    let mut cmd = Command::new(&exe);
    if explicit_socket {
        cmd.arg("--socket").arg(socket);
    }
    // Its own process group: a Ctrl-C in this terminal must not stop it.
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| {
        ClientError::Io(std::io::Error::new(
            e.kind(),
            format!("starting {}: {e}", exe.display()),
        ))
    })?;
    eprintln!("paraphym: started paraphymd (pid {})", child.id());
    let start = Instant::now();
    loop {
        match Client::connect(socket) {
            Ok(c) => return Ok(c),
            Err(ClientError::NotRunning { .. }) => {}
            Err(e) => return Err(e),
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Another client may have started one at the same moment.
            if let Ok(c) = Client::connect(socket) {
                return Ok(c);
            }
            return Err(ClientError::Io(std::io::Error::other(format!(
                "paraphymd exited ({status}) before it was ready; its log says why \
                 (~/.local/state/paraphym/paraphymd.log, or run `paraphymd` in a terminal)"
            ))));
        }
        if start.elapsed() > START_TIMEOUT {
            return Err(ClientError::Io(std::io::Error::other(
                "paraphymd did not start listening within 30 s",
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `paraphymd` next to this binary, else on the PATH.
fn daemon_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("paraphymd")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("paraphymd"))
}

/// Warn when the daemon is another release than this client.
pub fn check_version(client: &Client) {
    if let Ok(Response::Health(h)) = client.call(Request::Health) {
        let ours = env!("CARGO_PKG_VERSION");
        if h.version != ours {
            eprintln!(
                "paraphym: the running daemon is version {}, this client {ours}; \
                 `paraphym stop` replaces it on the next start",
                h.version
            );
        }
    }
}
