//! The HTTP bridge (`paraphymd --http`, issue 10) against the real daemon:
//! real clients (the `openai` package, Ollama's NDJSON, a Prometheus parser)
//! through tests/http/check_clients.py; cancellation when a client leaves;
//! malformed, oversized and slow requests get a 4xx or a timeout while other
//! clients are served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use paraphym_daemon::synth::Arch;
use paraphym_protocol::message::WorkerState;
use paraphym_tests::{status, tiny, wait_until, TestDaemon};

/// A free loopback port (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_daemon(extra: &[&str], env: &[(&str, &str)]) -> (TestDaemon, u16) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let args = [&["--http", &addr, "--prewarm", "1"][..], extra].concat();
    let daemon = TestDaemon::start_with_env(&args, env);
    // The Unix socket listens first; the bridge binds just after.
    let up = wait_until(Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "the HTTP bridge did not listen:\n{}", daemon.log_text());
    (daemon, port)
}

/// Send `raw` and read until the server closes (requests say `Connection: close`).
fn exchange(port: u16, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn post(port: u16, path: &str, body: &str) -> String {
    exchange(
        port,
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or("")
}

#[test]
fn real_clients_stream_list_and_parse_metrics() {
    let model = tiny(Arch::Qwen3);
    let model = model.to_str().unwrap();
    let (daemon, port) = http_daemon(&[], &[]);
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/http/check_clients.py"
        ))
        .arg(format!("http://127.0.0.1:{port}"))
        .arg(model)
        .output()
        .expect("python3");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
}

#[test]
fn a_client_that_leaves_mid_stream_frees_its_worker_within_a_token() {
    let model = tiny(Arch::Llama);
    let model = model.to_str().unwrap();
    let delay = 300;
    let (daemon, port) = http_daemon(
        &["--max-workers", "1"],
        &[("PARAPHYM_TEST_HOOKS", &format!("token_delay_ms={delay}"))],
    );
    let c = daemon.client();
    for path in ["/api/generate", "/v1/completions"] {
        let body = if path == "/api/generate" {
            format!(
                r#"{{"model":"{model}","prompt":"Once","raw":true,"options":{{"num_predict":200}}}}"#
            )
        } else {
            format!(r#"{{"model":"{model}","prompt":"Once","max_tokens":200,"stream":true}}"#)
        };
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        // Read until two tokens have come, then leave.
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        let key = if path == "/api/generate" {
            "\"done\":false"
        } else {
            "\"text\""
        };
        while seen.matches(key).count() < 2 {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed early: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(status_line(&seen).contains("200"), "{seen}");
        let before = daemon_tokens(port);
        drop(s);
        let left = Instant::now();
        let idle = wait_until(Duration::from_secs(10), || {
            status(&c)
                .models
                .iter()
                .all(|m| m.workers.iter().all(|w| w.state != WorkerState::Busy))
        });
        assert!(idle, "{path}: the worker is still busy");
        // Within one token (plus the relay's poll and scheduling).
        let took = left.elapsed();
        assert!(
            took < Duration::from_millis(delay + 400),
            "{path}: freed after {took:?}"
        );
        let after = daemon_tokens(port);
        assert!(after <= before + 1, "{path}: {before} tokens, then {after}");
    }
}

/// `paraphym_generated_tokens_total` from /metrics.
fn daemon_tokens(port: u16) -> u64 {
    let m = exchange(
        port,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    m.lines()
        .find_map(|l| l.strip_prefix("paraphym_generated_tokens_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no token counter in {m}"))
}

#[test]
fn bad_oversized_and_slow_requests_get_4xx_or_a_timeout_and_others_are_served() {
    let model = tiny(Arch::Gemma3);
    let model = model.to_str().unwrap();
    let (daemon, port) = http_daemon(
        &[
            "--http-header-timeout",
            "1s",
            "--http-body-timeout",
            "1s",
            "--http-max-body",
            "64KiB",
        ],
        &[],
    );
    // Slow clients first: they hold their connections while others are served.
    let mut slow_headers = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow_headers
        .write_all(b"POST /api/chat HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut slow_body = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow_body
        .write_all(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\"")
        .unwrap();
    let started = Instant::now();

    let ok = post(
        port,
        "/api/generate",
        &format!(
            r#"{{"model":"{model}","prompt":"Hi","stream":false,"options":{{"num_predict":3}}}}"#
        ),
    );
    assert!(status_line(&ok).contains("200"), "{ok}");

    for (body, want) in [
        ("{not json", "400"),
        (r#"{"model": 7, "prompt": "x"}"#, "400"),
        (r#"{"prompt": "x"}"#, "400"),
        (r#"{"model":"nope","prompt":"x"}"#, "404"),
        (
            &format!(r#"{{"model":"{model}","prompt":"x","format":42}}"#) as &str,
            "400",
        ),
    ] {
        let r = post(port, "/api/generate", body);
        assert!(status_line(&r).contains(want), "{body}: {r}");
        assert!(r.contains("\"error\""), "{body}: {r}");
    }
    let r = post(
        port,
        "/v1/chat/completions",
        r#"{"model":"m","messages":"x"}"#,
    );
    assert!(
        status_line(&r).contains("400") && r.contains("invalid_request_error"),
        "{r}"
    );
    let r = post(
        port,
        "/v1/chat/completions",
        &format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"x"}}],"n":2}}"#),
    );
    assert!(status_line(&r).contains("400"), "{r}");

    // Over the body limit: declared, and streamed without a length.
    let big = "x".repeat(100 << 10);
    let r = post(port, "/api/generate", &big);
    assert!(status_line(&r).contains("413"), "{}", status_line(&r));
    let mut chunked = b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..40 {
        chunked.extend_from_slice(format!("{:x}\r\n{}\r\n", 4096, "y".repeat(4096)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = exchange(port, &chunked);
    assert!(status_line(&r).contains("413"), "{}", status_line(&r));

    // Not HTTP at all; an unknown path; a wrong method.
    let r = exchange(port, b"HELLO THERE\r\n\r\n");
    assert!(r.is_empty() || status_line(&r).contains("400"), "{r}");
    let r = exchange(
        port,
        b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(status_line(&r).contains("404"), "{r}");
    let r = exchange(
        port,
        b"GET /api/chat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(status_line(&r).contains("405"), "{r}");

    // The slow ones were cut off: headers by the header timeout (closed,
    // with or without a 408), the body by the body timeout (408).
    slow_headers
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = Vec::new();
    let _ = slow_headers.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.is_empty() || status_line(&text).contains("408"),
        "{text}"
    );
    slow_body
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = [0u8; 512];
    let n = slow_body.read(&mut out).unwrap_or(0);
    let text = String::from_utf8_lossy(&out[..n]);
    assert!(status_line(&text).contains("408"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // And everyone else is still served, natively and over HTTP.
    let ok = post(
        port,
        "/api/chat",
        &format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"Hi"}}],"stream":false,"options":{{"num_predict":2}}}}"#
        ),
    );
    assert!(status_line(&ok).contains("200"), "{ok}");
    let health = exchange(
        port,
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        status_line(&health).contains("200") && health.contains("\"ok\""),
        "{health}"
    );
    assert!(!status(&daemon.client()).models.is_empty());
}

/// Log-probabilities over the socket are the log-softmax of the engine's own
/// logits (the same file loaded in this process), most likely first, summing
/// to at most 1; over HTTP they are the same numbers in OpenAI's shape.
#[test]
fn logprobs_match_the_engines_logits() {
    use paraphym_daemon::engine::{Engine, LoadOptions, LogitsFor, Prompt as EnginePrompt};
    use paraphym_protocol::client::Piece;
    use paraphym_protocol::message::{Generate, Options, Prompt};

    let path = tiny(Arch::Qwen3);
    let model = path.to_str().unwrap();
    let (daemon, port) = http_daemon(&[], &[]);
    let prompt = "The old lighthouse keeper";
    let gen = Generate {
        model: Some(model.into()),
        prompt: Prompt::Raw(prompt.into()),
        options: Options {
            temperature: Some(0.0),
            max_tokens: Some(5),
            ignore_eos: true,
            logprobs: Some(5),
            ..Options::default()
        },
        keep_alive_ms: None,
        session: None,
    };
    let mut got = Vec::new();
    for p in daemon.client().generate(gen).unwrap() {
        match p.unwrap() {
            Piece::Logprobs(l) => got.extend(l),
            Piece::Done(s) => assert_eq!(s.generated_tokens, 5),
            Piece::Token(_) | Piece::Stage(_) => {}
        }
    }
    assert_eq!(got.len(), 5, "one entry per generated token");

    let mut engine = Engine::load(&path, &LoadOptions::default()).unwrap();
    let mut tokens = engine.prompt_tokens(EnginePrompt::Text(prompt)).unwrap();
    let model_ref = engine.model_mut();
    let mut feed = tokens.clone();
    for (i, lp) in got.iter().enumerate() {
        let row: Vec<f32> = model_ref
            .forward(&feed, LogitsFor::Last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = f64::from(max)
            + row
                .iter()
                .map(|&x| f64::from(x - max).exp())
                .sum::<f64>()
                .ln();
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        assert_eq!(lp.top.len(), 5);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(lp.token, order[0] as u32, "token {i}");
        assert_eq!(lp.top[0].token, lp.token);
        let mut mass = 0.0;
        for (t, want) in lp.top.iter().zip(&order) {
            assert_eq!(t.token, *want as u32, "token {i}: order");
            let expect = f64::from(row[*want]) - lse;
            assert!(
                (f64::from(t.logprob) - expect).abs() < 1e-4,
                "token {i}: {} vs the engine's {expect}",
                t.logprob
            );
            mass += f64::from(t.logprob).exp();
        }
        assert!(mass <= 1.0 + 1e-5, "token {i}: top-5 mass {mass}");
        assert!((lp.logprob - lp.top[0].logprob).abs() < 1e-6);
        tokens.push(lp.token);
        feed = vec![lp.token];
    }

    // The same through OpenAI's completions endpoint.
    let r = post(
        port,
        "/v1/completions",
        &format!(
            r#"{{"model":"{model}","prompt":"{prompt}","max_tokens":5,"temperature":0,"logprobs":5}}"#
        ),
    );
    let body: serde_json::Value = serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap())
        .unwrap_or_else(|e| panic!("{e}: {r}"));
    let lp = &body["choices"][0]["logprobs"];
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(token_logprobs.len(), 5, "{body}");
    for (i, (a, b)) in token_logprobs.iter().zip(&got).enumerate() {
        assert!(
            (a.as_f64().unwrap() - f64::from(b.logprob)).abs() < 1e-6,
            "token {i}"
        );
        let alternatives = lp["top_logprobs"][i].as_object().unwrap();
        let mass: f64 = alternatives
            .values()
            .map(|v| v.as_f64().unwrap().exp())
            .sum();
        assert!(mass <= 1.0 + 1e-5);
    }
    let offsets = lp["text_offset"].as_array().unwrap();
    assert_eq!(offsets[0], 0);
}

/// Tools reach the template (Qwen3's takes them: the prompt grows by their
/// description; an earlier call and its answer render too); a template
/// without tools refuses them rather than dropping them.
#[test]
fn tools_are_offered_through_the_template_or_refused() {
    let (qwen, gemma) = (tiny(Arch::Qwen3), tiny(Arch::Gemma3));
    let (daemon, port) = http_daemon(&[], &[]);
    let tools = r#"[{"type":"function","function":{"name":"get_weather","description":"The weather in a city.","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}]"#;
    let ask = |model: &std::path::Path, messages: &str, with_tools: bool| {
        let extra = if with_tools {
            format!(r#","tools":{tools}"#)
        } else {
            String::new()
        };
        post(
            port,
            "/v1/chat/completions",
            &format!(
                r#"{{"model":"{}","messages":{messages},"max_tokens":2,"temperature":0{extra}}}"#,
                model.display()
            ),
        )
    };
    let prompt_tokens = |r: &str| -> u64 {
        assert!(status_line(r).contains("200"), "{r}");
        let body: serde_json::Value =
            serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        body["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let question = r#"[{"role":"user","content":"Weather in Oslo?"}]"#;
    let plain = prompt_tokens(&ask(&qwen, question, false));
    let offered = prompt_tokens(&ask(&qwen, question, true));
    assert!(offered > plain + 50, "{plain} -> {offered}");
    let history = r#"[{"role":"user","content":"Weather in Oslo?"},{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Oslo\"}"}}]},{"role":"tool","tool_call_id":"call_1","content":"{\"temp_c\": -3}"}]"#;
    let answered = prompt_tokens(&ask(&qwen, history, true));
    assert!(answered > offered + 10, "{offered} -> {answered}");
    // Ollama's shape, streamed.
    let r = post(
        port,
        "/api/chat",
        &format!(
            r#"{{"model":"{}","messages":{question},"tools":{tools},"options":{{"num_predict":2}}}}"#,
            qwen.display()
        ),
    );
    assert!(
        status_line(&r).contains("200") && r.contains("\"done\":true"),
        "{r}"
    );
    // Gemma 3's template has no tools.
    let r = ask(&gemma, question, true);
    assert!(
        status_line(&r).contains("400") && r.contains("does not take tools"),
        "{r}"
    );
    let r = post(
        port,
        "/v1/chat/completions",
        &format!(
            r#"{{"model":"{}","messages":{question},"tools":{tools},"tool_choice":"required"}}"#,
            qwen.display()
        ),
    );
    assert!(status_line(&r).contains("400"), "{r}");
    drop(daemon);
}

/// Ollama's `num_ctx`: a load with it serves that many positions (`/api/ps`
/// says so); a generation is held to a smaller one (`done_reason: length`)
/// and a prompt past it is a 400; 0 is a 400.
#[test]
fn ollama_num_ctx_is_the_requests_context() {
    let model = tiny(Arch::Qwen3);
    let model = model.to_str().unwrap();
    let (_daemon, port) = http_daemon(&["--context", "128"], &[]);
    let json_body = |r: &str| -> serde_json::Value {
        assert!(status_line(r).contains("200"), "{r}");
        serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap())
            .unwrap_or_else(|e| panic!("{e}: {r}"))
    };
    let r = post(
        port,
        "/api/generate",
        &format!(r#"{{"model":"{model}","options":{{"num_ctx":2048}}}}"#),
    );
    json_body(&r);
    let ps = json_body(&exchange(
        port,
        b"GET /api/ps HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ));
    assert_eq!(ps["models"][0]["context_length"], 2048, "{ps}");

    let generate = |num_ctx: i64, prompt_words: usize| {
        post(
            port,
            "/api/generate",
            &format!(
                r#"{{"model":"{model}","prompt":"{}","raw":true,"stream":false,"options":{{"num_ctx":{num_ctx},"num_predict":100,"temperature":0}}}}"#,
                vec!["word"; prompt_words].join(" ")
            ),
        )
    };
    let held = json_body(&generate(24, 4));
    assert_eq!(held["done_reason"], "length", "{held}");
    let used = held["prompt_eval_count"].as_u64().unwrap() + held["eval_count"].as_u64().unwrap();
    assert!((24..=25).contains(&used), "{held}");
    let over = generate(24, 40);
    assert!(status_line(&over).contains("400"), "{over}");
    assert!(over.contains("24"), "{over}");
    let zero = generate(0, 4);
    assert!(status_line(&zero).contains("400"), "{zero}");
    assert!(zero.contains("num_ctx"), "{zero}");
}
