//! The real `paraphym` TUI inside tmux against a real daemon: keys typed
//! with `send-keys`, the screen read with `capture-pane`. A debug-only
//! per-token delay (test hook) makes each reply last seconds, long enough to
//! watch its worker busy.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use paraphym_daemon::synth::Arch;
use paraphym_tests::{bin, cli, tiny, wait_until, TempDir, TestDaemon};

/// One tmux server of our own (`-L`), so a test never touches the user's.
struct Tmux {
    server: String,
}

impl Tmux {
    fn new(tag: &str) -> Self {
        Self {
            server: format!("paraphym-it-{tag}-{}", std::process::id()),
        }
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-f", "/dev/null", "-L", &self.server])
            .args(args)
            .output()
            .expect("tmux (install it: apt-get install tmux)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A session `name` of `w`×`h` running `cmd` with `env`.
    fn open(&self, name: &str, w: u16, h: u16, cmd: &[&str], env: &[(&str, &str)]) {
        let (w, h) = (w.to_string(), h.to_string());
        let mut args = vec!["new-session", "-d", "-s", name, "-x", &w, "-y", &h];
        let vars: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for v in &vars {
            args.extend(["-e", v.as_str()]);
        }
        args.extend(cmd);
        self.tmux(&args);
        // The window keeps the size we asked for whatever clients attach.
        self.tmux(&["set-option", "-t", name, "window-size", "manual"]);
    }

    fn screen(&self, name: &str) -> String {
        self.tmux(&["capture-pane", "-p", "-t", name])
    }

    fn type_text(&self, name: &str, text: &str) {
        self.tmux(&["send-keys", "-t", name, "-l", text]);
    }

    fn key(&self, name: &str, key: &str) {
        self.tmux(&["send-keys", "-t", name, key]);
    }

    fn resize(&self, name: &str, w: u16, h: u16) {
        self.tmux(&[
            "resize-window",
            "-t",
            name,
            "-x",
            &w.to_string(),
            "-y",
            &h.to_string(),
        ]);
    }

    /// Wait until the screen satisfies `ok`; the screen then.
    fn wait(&self, name: &str, what: &str, secs: u64, ok: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        let found = wait_until(Duration::from_secs(secs), || {
            last = self.screen(name);
            ok(&last)
        });
        assert!(
            found,
            "{name}: waited {secs} s for {what}; the screen:\n{last}"
        );
        last
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.server, "kill-server"])
            .output();
    }
}

/// Letters and digits only: wrapping, indentation and Markdown marks aside.
fn letters(s: &str) -> String {
    s.chars().filter(|c| c.is_alphanumeric()).collect()
}

/// A reply is streaming: the footer offers to stop it.
fn replying(screen: &str) -> bool {
    screen
        .lines()
        .last()
        .is_some_and(|l| l.contains("Esc stops"))
}

/// The last reply is done: the footer shows the key hints again and the
/// reply's statistics line is on screen.
fn replied(screen: &str) -> bool {
    screen.lines().last().is_some_and(|l| l.contains("F1 keys"))
        && screen.contains("tok/s · first token")
}

#[test]
fn the_tui_streams_shows_the_workers_and_survives_a_daemon_restart() {
    let model = tiny(Arch::Qwen3);
    let m = model.to_str().unwrap();
    let mut daemon = TestDaemon::start_with_env(
        &["--prewarm", "2", "--max-workers", "2"],
        &[("PARAPHYM_TEST_HOOKS", "token_delay_ms=120")],
    );
    let socket = daemon.socket.to_str().unwrap().to_owned();
    // What the same request gives through the CLI: the TUI must show it.
    let out = cli(
        &daemon.socket,
        &[
            "run",
            "--model",
            m,
            "--seed",
            "1",
            "--max-tokens",
            "30",
            "Hello there",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = letters(&String::from_utf8_lossy(&out.stdout));
    assert!(
        expected.chars().count() >= 8,
        "too little text to compare: {expected:?}"
    );
    let expected: String = expected.chars().take(12).collect();

    let data = TempDir::new("tui");
    let data_dir = data.path().to_str().unwrap().to_owned();
    let paraphym = bin("paraphym");
    let cmd = [
        paraphym.to_str().unwrap(),
        "--socket",
        &socket,
        "--model",
        m,
        "--seed",
        "1",
        "--max-tokens",
        "30",
    ];
    let env = [
        ("XDG_DATA_HOME", data_dir.as_str()),
        ("TERM", "xterm-256color"),
    ];
    let tmux = Tmux::new("tui");
    tmux.open("a", 80, 24, &cmd, &env);
    let ready =
        |s: &str| s.contains("paraphymd 0.1.0") && s.contains("#0 idle") && s.contains("#1 idle");
    let screen = tmux.wait("a", "connected, two idle workers", 30, ready);

    // The layout at 80×24: status bar on top, engine view, input, hints.
    let lines: Vec<&str> = screen.lines().collect();
    assert_eq!(lines.len(), 24, "{screen}");
    assert!(
        lines[0].contains("paraphym") && lines[0].contains("tiny-qwen3"),
        "{screen}"
    );
    assert!(lines.iter().any(|l| l.starts_with("┌ Engine")), "{screen}");
    assert!(lines[20].starts_with("┌ Message"), "{screen}");
    assert!(lines[23].contains("F1 keys"), "{screen}");
    assert!(lines.iter().all(|l| l.chars().count() <= 80));

    // A reply streams; its worker is busy meanwhile and idle after.
    tmux.type_text("a", "Hello there");
    tmux.key("a", "Enter");
    tmux.wait("a", "a busy worker while it streams", 15, |s| {
        s.contains(" busy") && replying(s)
    });
    let done = tmux.wait("a", "the answer and its stats", 30, replied);
    assert!(
        letters(&done).contains(&expected),
        "expected {expected:?} on screen:\n{done}"
    );
    tmux.wait("a", "both workers idle again", 15, |s| {
        !s.contains(" busy") && s.contains("#0 idle")
    });

    // A second TUI on the same daemon: both reply at once, and the first
    // one's engine view shows the load of both.
    tmux.open("b", 80, 24, &cmd, &env);
    tmux.wait("b", "connected", 30, ready);
    tmux.type_text("a", "First");
    tmux.type_text("b", "Second");
    tmux.key("a", "Enter");
    tmux.key("b", "Enter");
    tmux.wait("a", "two busy workers", 15, |s| {
        s.matches(" busy").count() >= 2 && replying(s)
    });
    tmux.wait("a", "its second answer", 30, replied);
    tmux.wait("b", "its answer", 30, replied);
    // With the engine view hidden (Ctrl+T) each transcript shows its own
    // exchange.
    for (name, prompt) in [("a", "First"), ("b", "Second")] {
        tmux.key(name, "C-t");
        tmux.wait(name, "its own prompt in the transcript", 10, |s| {
            !s.contains("┌ Engine")
                && s.lines()
                    .any(|l| l.split_whitespace().next() == Some(prompt))
        });
        tmux.key(name, "C-t");
    }

    // The daemon dies: a banner; it comes back: the TUI reconnects and works.
    daemon.kill();
    tmux.wait("a", "the banner", 15, |s| s.contains("daemon unreachable"));
    daemon.restart();
    // (The new daemon loads the model again on this first request.)
    tmux.wait("a", "reconnected", 20, |s| {
        !s.contains("daemon unreachable") && s.contains("paraphymd 0.1.0")
    });
    tmux.type_text("a", "Again");
    tmux.key("a", "Enter");
    tmux.wait("a", "a reply after the restart", 20, replying);
    tmux.wait("a", "its end", 30, replied);

    // Resize: too small says so; back to 80×24 the layout returns.
    tmux.resize("a", 50, 12);
    tmux.wait("a", "the too-small message", 10, |s| {
        s.contains("needs at least 60×16")
    });
    tmux.resize("a", 80, 24);
    tmux.wait("a", "the layout again", 10, |s| {
        s.contains("┌ Message") && s.contains("┌ Engine")
    });

    // Quit with Ctrl+Q: the chat was saved under the data directory.
    tmux.key("a", "C-q");
    let chats = Path::new(&data_dir).join("paraphym/chats");
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_dir(&chats)
            .is_ok_and(|d| d.count() >= 2)),
        "chats saved in {}",
        chats.display()
    );
}
