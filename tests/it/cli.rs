//! The `paraphym` subcommands against the real daemon: output, exit codes,
//! autostart.

use std::process::{Command, Stdio};
use std::time::Duration;

use paraphym_daemon::synth::Arch;
use paraphym_tests::{bin, cli, cli_env, gemma_path, tiny, wait_until, TempDir, TestDaemon};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn run_completes_paris_with_france_on_the_real_gemma() {
    let gemma = gemma_path();
    let daemon = TestDaemon::start(&[]);
    let out = daemon.cli(&[
        "run",
        "--raw",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--model",
        gemma.to_str().unwrap(),
        "Paris is the capital of",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("France"), "{:?}", stdout(&out));

    // The same through stdin and --json: one object per event, text identical.
    let json = cli(
        &daemon.socket,
        &[
            "run",
            "--json",
            "--raw",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--model",
            gemma.to_str().unwrap(),
        ],
        Some("Paris is the capital of"),
    );
    assert!(json.status.success(), "{}", stderr(&json));
    let events: Vec<serde_json::Value> = stdout(&json)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let text: String = events
        .iter()
        .filter(|e| e["event"] == "token")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, stdout(&out));
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done");
    assert_eq!(done["generated_tokens"], 8);
    assert_eq!(done["stop"], "max_tokens");
}

#[test]
fn exit_codes_tell_scripts_what_happened() {
    let model = tiny(Arch::Qwen3);
    let m = model.to_str().unwrap();
    let daemon = TestDaemon::start(&["--context", "64", "--max-queue", "1"]);
    let code = |args: &[&str]| daemon.cli(args).status.code();

    assert_eq!(code(&["run", "--model", "no-such-model", "hi"]), Some(4));
    assert_eq!(
        code(&["run", "--raw", "--model", m, &"word ".repeat(200)]),
        Some(6)
    );
    assert_eq!(code(&["run", "--temperature", "warm", "hi"]), Some(2));
    assert_eq!(
        code(&["run", "--raw", "--no-think", "--think", "hi"]),
        Some(2)
    );
    assert_eq!(code(&["unload", "never-loaded"]), Some(4));

    drop(daemon);

    // Busy: one generation running, one waiting (a queue of 1), a third
    // refused with exit code 5. The running one is long and is cancelled
    // afterwards, so the queue is still full when the third arrives. One
    // request per worker (`--batch 1`): a batch would take the second in.
    let daemon = TestDaemon::start(&[
        "--max-queue",
        "1",
        "--prewarm",
        "1",
        "--max-workers",
        "1",
        "--batch",
        "1",
    ]);
    let client = daemon.client();
    let gen = |max: u32| paraphym_protocol::message::Generate {
        model: Some(m.to_owned()),
        prompt: paraphym_protocol::message::Prompt::Raw("go".into()),
        options: paraphym_protocol::message::Options {
            max_tokens: Some(max),
            ignore_eos: true,
            ..Default::default()
        },
        keep_alive_ms: None,
        session: None,
    };
    let mut running = client.generate(gen(4000)).unwrap();
    assert!(matches!(
        paraphym_tests::next_piece(&mut running),
        Some(Ok(paraphym_protocol::client::Piece::Token(_)))
    ));
    let queued = client.generate(gen(4)).unwrap();
    let busy = daemon.cli(&["run", "--raw", "--model", m, "hi"]);
    running.cancel().unwrap();
    let (_, first) = running.collect_text().unwrap();
    let (_, second) = queued.collect_text().unwrap();
    assert_eq!(busy.status.code(), Some(5), "{}", stderr(&busy));
    assert!(stderr(&busy).contains("try again"), "{}", stderr(&busy));
    assert_eq!(
        first.stop,
        paraphym_protocol::message::StopReason::Cancelled,
        "still running when the third request came"
    );
    assert_eq!(second.generated_tokens, 4, "the queued one was served");
}

#[test]
fn ctrl_c_cancels_the_generation_with_exit_130() {
    let model = tiny(Arch::Llama);
    let daemon = TestDaemon::start(&[]);
    let mut child = Command::new(bin("paraphym"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["run", "--raw", "--max-tokens", "4000", "--model"])
        .arg(&model)
        .arg("An endless tale")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it streams, then interrupt it as a terminal would.
    let streaming = wait_until(Duration::from_secs(20), || {
        daemon.log_text().contains("model loaded")
    });
    assert!(streaming);
    std::thread::sleep(Duration::from_millis(300));
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let out = {
        let start = std::time::Instant::now();
        loop {
            if let Some(_s) = child.try_wait().unwrap() {
                break child.wait_with_output().unwrap();
            }
            assert!(start.elapsed() < Duration::from_secs(10), "exits");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(!out.stdout.is_empty(), "some text came first");
}

#[test]
fn ps_health_and_stop_never_start_a_daemon_but_run_does() {
    let model = tiny(Arch::Gemma3);
    let dir = TempDir::new("auto");
    let socket = dir.path().join("d.sock");
    let state = dir.path().join("state");
    let env = [("XDG_STATE_HOME", state.to_str().unwrap())];
    for cmd in ["ps", "health", "stop", "models", "unload"] {
        let args: Vec<&str> = if cmd == "unload" {
            vec![cmd, "x"]
        } else {
            vec![cmd]
        };
        let out = cli_env(&socket, &args, None, &env);
        assert_eq!(out.status.code(), Some(3), "{cmd}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no daemon"),
            "{cmd}: {}",
            stderr(&out)
        );
        assert!(!socket.exists(), "{cmd} started a daemon");
    }
    let out = cli_env(
        &socket,
        &[
            "run",
            "--raw",
            "--max-tokens",
            "4",
            "--model",
            model.to_str().unwrap(),
            "Hello",
        ],
        None,
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("started paraphymd"));
    // It keeps running for the next command, with the model warm.
    let ps = cli(&socket, &["ps"], None);
    assert!(ps.status.success());
    assert!(stdout(&ps).contains("tiny-gemma3"), "{}", stdout(&ps));
    let health = cli(&socket, &["health", "--json"], None);
    let h: serde_json::Value = serde_json::from_slice(&health.stdout).unwrap();
    assert_eq!(h["ok"], true);
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    // Its log went to the state folder.
    assert!(state.join("paraphym/paraphymd.log").is_file());
    let stop = cli(&socket, &["stop"], None);
    assert!(stop.status.success(), "{}", stderr(&stop));
    assert!(!socket.exists());
}

#[test]
fn load_unload_models_and_pull() {
    let model = tiny(Arch::Phi3);
    let m = model.to_str().unwrap();
    let hf = TempDir::new("hf");
    // Downloads go nowhere: a refused endpoint is "offline", said clearly.
    let daemon = TestDaemon::start_with_env(
        &["--context", "512"],
        &[
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
            ("HF_HOME", hf.path().to_str().unwrap()),
        ],
    );
    let load = daemon.cli(&["load", m, "--keep-alive", "forever", "--context", "2048"]);
    assert!(load.status.success(), "{}", stderr(&load));
    assert!(stdout(&load).contains("loaded"));
    let zero = daemon.cli(&["load", m, "--context", "0"]);
    assert_eq!(zero.status.code(), Some(2), "{}", stderr(&zero));
    let models = daemon.cli(&["models", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&models.stdout).unwrap();
    assert_eq!(list[0]["loaded"], true);
    assert_eq!(list[0]["architecture"], "phi3");
    let ps = daemon.cli(&["ps", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    assert_eq!(status["models"][0]["workers"][0]["state"], "Idle");
    assert_eq!(status["models"][0]["context"], 2048);
    assert!(status["memory_used_bytes"].as_u64().unwrap() > 0);
    let table = stdout(&daemon.cli(&["ps"]));
    assert!(
        table.contains("CONTEXT") && table.contains("2048"),
        "{table}"
    );

    let unload = daemon.cli(&["unload", m]);
    assert!(unload.status.success(), "{}", stderr(&unload));
    let ps = daemon.cli(&["ps"]);
    assert!(stdout(&ps).contains("no models loaded"), "{}", stdout(&ps));

    // A local file needs no download: pull prints its path.
    let pull = daemon.cli(&["pull", m]);
    assert!(pull.status.success(), "{}", stderr(&pull));
    assert_eq!(stdout(&pull).trim(), m);
    let offline = daemon.cli(&["pull", "gemma3:270m"]);
    assert_eq!(offline.status.code(), Some(1));
    assert!(
        stderr(&offline).contains("cannot reach"),
        "{}",
        stderr(&offline)
    );
}

/// scripts/paraphym_client.py, written from docs/PROTOCOL.md alone, gets what
/// `paraphym run --json` gets for the same seed.
#[test]
fn the_python_client_streams_what_the_cli_streams() {
    let gemma = gemma_path();
    let g = gemma.to_str().unwrap();
    let daemon = TestDaemon::start(&[]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("scripts/paraphym_client.py");
    let cases: [&[&str]; 3] = [
        &[
            "--raw",
            "--temperature",
            "0.7",
            "--seed",
            "7",
            "--max-tokens",
            "12",
            "Paris is the capital of",
        ],
        &[
            "--system",
            "Answer in one word.",
            "--temperature",
            "0.9",
            "--seed",
            "3",
            "--max-tokens",
            "10",
            "Name a fruit.",
        ],
        &[
            "--raw",
            "--seed",
            "11",
            "--stop",
            ".",
            "--max-tokens",
            "40",
            "The weather today is",
        ],
    ];
    let parse = |out: &std::process::Output| -> (String, serde_json::Value) {
        let events: Vec<serde_json::Value> = stdout(out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let text = events
            .iter()
            .filter(|e| e["event"] == "token")
            .map(|e| e["text"].as_str().unwrap())
            .collect();
        let done = events.last().cloned().unwrap();
        (text, done)
    };
    for case in cases {
        let mut rust_args = vec!["run", "--json", "--model", g];
        rust_args.extend_from_slice(case);
        let rust = daemon.cli(&rust_args);
        assert!(rust.status.success(), "{}", stderr(&rust));
        let py = Command::new("python3")
            .arg(&script)
            .arg("--socket")
            .arg(&daemon.socket)
            .args(["--json", "--model", g])
            .args(case)
            .output()
            .unwrap();
        assert!(py.status.success(), "{}", stderr(&py));
        let (rust_text, rust_done) = parse(&rust);
        let (py_text, py_done) = parse(&py);
        assert!(!rust_text.is_empty());
        assert_eq!(py_text, rust_text, "{case:?}");
        for key in ["event", "prompt_tokens", "generated_tokens", "stop"] {
            assert_eq!(py_done[key], rust_done[key], "{key} in {case:?}");
        }
    }
    // Its exit codes follow the CLI's.
    let unknown = Command::new("python3")
        .arg(&script)
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["--model", "no-such-model", "hi"])
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(4));
}
