//! Bad input and bad clients: each gets a clear error (or is cut off) and
//! everyone else is served normally.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use paraphym_daemon::synth::Arch;
use paraphym_protocol::frame::FrameError;
use paraphym_protocol::handshake;
use paraphym_protocol::message::{
    ErrorKind, Generate, Options, Prompt, Request, Response, StopReason, WorkerState,
};
use paraphym_protocol::{codec, PROTOCOL_VERSION};
use paraphym_tests::{tiny, wait_until, RawConn, TestDaemon};

fn generate(model: &str, prompt: &str, max_tokens: u32) -> Request {
    Request::Generate(Generate {
        model: Some(model.to_owned()),
        prompt: Prompt::Raw(prompt.to_owned()),
        options: Options {
            max_tokens: Some(max_tokens),
            seed: Some(1),
            ..Options::default()
        },
        keep_alive_ms: None,
        session: None,
    })
}

/// Everyone else is still served: a fresh client completes a generation.
fn still_serves(daemon: &TestDaemon, model: &str) {
    let client = daemon.client();
    let Request::Generate(g) = generate(model, "Still there?", 4) else {
        unreachable!()
    };
    let (_, stats) = client.generate(g).unwrap().collect_text().unwrap();
    assert_eq!(stats.generated_tokens, 4);
}

fn error_of(msg: &paraphym_protocol::message::DaemonMsg) -> (ErrorKind, String) {
    match &msg.response {
        Response::Error(e) => (e.kind, e.message.clone()),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Read until the daemon closes the connection (bounded).
fn closes(conn: &mut RawConn) -> bool {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(20) {
        match conn.0.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
    false
}

fn status_workers(daemon: &TestDaemon) -> Vec<WorkerState> {
    match daemon.client().call(Request::Status).unwrap() {
        Response::Status(s) => s
            .models
            .iter()
            .flat_map(|m| m.workers.iter().map(|w| w.state))
            .collect(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_frames_get_clear_errors_and_others_are_served() {
    let model = tiny(Arch::Qwen3);
    let m = model.to_str().unwrap();
    let daemon = TestDaemon::start(&[]);

    // Not our protocol at all: closed without an answer.
    let mut s = UnixStream::connect(&daemon.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty(), "no answer to a foreign greeting");

    // A wrong protocol version: told "incompatible" with the daemon's version.
    let mut s = UnixStream::connect(&daemon.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&handshake::hello(PROTOCOL_VERSION + 41))
        .unwrap();
    let mut answer = [0u8; 13];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer[..8], b"PARAPHYM");
    assert_eq!(
        u32::from_le_bytes(answer[8..12].try_into().unwrap()),
        PROTOCOL_VERSION
    );
    assert_eq!(answer[12], handshake::INCOMPATIBLE);

    // An unknown message variant in a good frame: BadRequest naming the
    // request id, and the connection stays usable.
    let mut c = RawConn::open(&daemon.socket);
    let mut payload = codec::encode(&paraphym_protocol::message::ClientMsg {
        id: 77,
        request: Request::Health,
    })
    .unwrap();
    payload[8] = 250;
    let mut framed = (payload.len() as u32).to_le_bytes().to_vec();
    framed.extend_from_slice(&payload);
    c.send_bytes(&framed);
    let msg = c.recv().unwrap();
    assert_eq!(msg.id, 77);
    let (kind, message) = error_of(&msg);
    assert_eq!(kind, ErrorKind::BadRequest);
    assert!(message.contains("undecodable"), "{message}");
    c.send(78, Request::Health);
    let msg = c.recv().unwrap();
    assert!(matches!(msg.response, Response::Health(_)));

    // Garbage bytes after the handshake: a frame whose length is over the
    // limit is answered with BadRequest, then the connection is closed.
    let mut c = RawConn::open(&daemon.socket);
    c.send_bytes(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8]);
    let msg = c.recv().unwrap();
    let (kind, message) = error_of(&msg);
    assert_eq!(kind, ErrorKind::BadRequest);
    assert!(message.contains("limit"), "{message}");
    // Closed (or reset: the rest of the garbage was never read).
    assert!(matches!(
        c.recv(),
        Err(FrameError::Closed | FrameError::Io(_))
    ));

    // Short garbage that frames correctly but decodes to nothing.
    let mut c = RawConn::open(&daemon.socket);
    c.send_bytes(&[3, 0, 0, 0, 0xff, 0xfe, 0xfd]);
    let (kind, _) = error_of(&c.answer());
    assert_eq!(kind, ErrorKind::BadRequest);

    // A truncated frame, then the client leaves: nothing breaks.
    let mut c = RawConn::open(&daemon.socket);
    c.send_bytes(&[100, 0, 0, 0, 1, 2, 3]);
    drop(c);

    // A length prefix at the limit that never delivers costs nothing and
    // does not block anyone.
    let mut c = RawConn::open(&daemon.socket);
    c.send_bytes(&(16u32 << 20).to_le_bytes());

    still_serves(&daemon, m);
    drop(c);
}

#[test]
fn unknown_models_and_oversize_prompts_are_typed_errors() {
    let model = tiny(Arch::Qwen3);
    let m = model.to_str().unwrap();
    let daemon = TestDaemon::start(&["--context", "64"]);
    let mut c = RawConn::open(&daemon.socket);

    c.send(1, generate("no-such-model", "hi", 4));
    let (kind, message) = error_of(&c.answer());
    assert_eq!(kind, ErrorKind::UnknownModel);
    assert!(message.contains("no-such-model"), "{message}");

    c.send(2, generate("/nowhere/model.gguf", "hi", 4));
    assert_eq!(error_of(&c.answer()).0, ErrorKind::UnknownModel);

    // An alias that is not downloaded says how to get it.
    c.send(3, generate("gemma3:4b", "hi", 4));
    let (kind, message) = error_of(&c.answer());
    assert_eq!(kind, ErrorKind::UnknownModel);
    assert!(message.contains("paraphym pull gemma3:4b"), "{message}");

    // Over the context (64 positions here).
    c.send(4, generate(m, &"word ".repeat(200), 4));
    let (kind, message) = error_of(&c.answer());
    assert_eq!(kind, ErrorKind::ContextOverflow);
    assert!(message.contains("context"), "{message}");

    // Out-of-range options.
    let Request::Generate(mut g) = generate(m, "hi", 4) else {
        unreachable!()
    };
    g.options.temperature = Some(-1.0);
    c.send(5, Request::Generate(g));
    assert_eq!(error_of(&c.answer()).0, ErrorKind::BadRequest);

    // A file that is not a model: the load fails with a reason.
    let junk = daemon.dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all").unwrap();
    c.send(6, generate(junk.to_str().unwrap(), "hi", 4));
    let (kind, message) = error_of(&c.answer());
    assert_eq!(kind, ErrorKind::ModelFailed);
    assert!(message.contains("junk.gguf"), "{message}");

    // A prompt that fills the context exactly still runs (and stops).
    c.send(7, generate(m, "word", 1000));
    loop {
        let msg = c.recv().unwrap();
        match msg.response {
            Response::Token { .. } | Response::Stage(_) => {}
            Response::Done(s) => {
                assert_eq!(s.stop, StopReason::ContextFull);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    still_serves(&daemon, m);
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_worker() {
    let model = tiny(Arch::Llama);
    let m = model.to_str().unwrap();
    let daemon = TestDaemon::start(&["--prewarm", "1", "--max-workers", "1"]);
    let mut c = RawConn::open(&daemon.socket);
    c.send(1, generate(m, "Tell me everything", 4000));
    let mut tokens = 0;
    while tokens < 3 {
        match c.recv().unwrap().response {
            Response::Token { .. } => tokens += 1,
            Response::Stage(_) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(status_workers(&daemon), vec![WorkerState::Busy]);
    drop(c);
    // It stops within a token or so: the only worker is idle again at once.
    let freed = wait_until(Duration::from_secs(2), || {
        status_workers(&daemon) == vec![WorkerState::Idle]
    });
    assert!(freed, "{:?}", status_workers(&daemon));
    still_serves(&daemon, m);
}

#[test]
fn a_client_that_never_reads_is_cut_off_and_blocks_no_one() {
    let model = tiny(Arch::Qwen3);
    let m = model.to_str().unwrap();
    // Small outbox and timeout so the test is quick; the defaults are 1 MiB
    // and 10 s (docs/PROTOCOL.md).
    let daemon = TestDaemon::start(&[
        "--prewarm",
        "2",
        "--max-workers",
        "2",
        "--outbox-bytes",
        "4096",
        "--write-timeout",
        "1s",
    ]);
    let mut stuck = RawConn::open(&daemon.socket);
    stuck.send(1, generate(m, "Never read this", 4000));
    // While it is stuck, another client is served normally.
    std::thread::sleep(Duration::from_millis(300));
    still_serves(&daemon, m);
    // The stuck generation is cancelled and its connection closed; both
    // workers end idle.
    let freed = wait_until(Duration::from_secs(15), || {
        status_workers(&daemon)
            .iter()
            .all(|s| *s == WorkerState::Idle)
    });
    assert!(freed, "{:?}", status_workers(&daemon));
    assert!(daemon.log_text().contains("has not read"));
    stuck
        .0
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(closes(&mut stuck), "the stuck connection is closed");
    still_serves(&daemon, m);
}

#[test]
fn sixty_four_clients_at_once() {
    let model = tiny(Arch::Qwen3);
    let m = model.to_str().unwrap().to_owned();
    let daemon = TestDaemon::start(&["--prewarm", "2"]);
    // Load first so the burst measures the server, not the loader.
    daemon
        .client()
        .call(Request::Load {
            model: m.clone(),
            keep_alive_ms: None,
            context: None,
        })
        .unwrap();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(64));
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let socket = daemon.socket.clone();
            let barrier = barrier.clone();
            let m = m.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let client = paraphym_protocol::client::Client::connect(&socket).unwrap();
                if i % 2 == 0 {
                    matches!(
                        client.call(Request::Health).unwrap(),
                        Response::Health(h) if h.ok
                    )
                } else {
                    let Request::Generate(g) = generate(&m, &format!("Client {i}"), 3) else {
                        unreachable!()
                    };
                    client
                        .generate(g)
                        .unwrap()
                        .collect_text()
                        .unwrap()
                        .1
                        .generated_tokens
                        == 3
                }
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert!(h.join().unwrap(), "client {i}");
    }
}

#[test]
fn past_the_connection_limit_a_client_is_told_busy() {
    let daemon = TestDaemon::start(&["--max-connections", "2"]);
    let a = daemon.client();
    let b = daemon.client();
    assert!(matches!(a.call(Request::Health), Ok(Response::Health(_))));
    let c = daemon.client();
    // The daemon's id-0 Busy reaches the request, then the connection closes.
    let err = c.call(Request::Health).unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::Busy), "{err}");
    assert!(err.to_string().contains("at most 2 connections"), "{err}");
    // The CLI says so with exit code 5.
    assert_eq!(daemon.cli(&["ps"]).status.code(), Some(5));
    drop(b);
    // A slot freed is a slot usable again.
    let ok = wait_until(Duration::from_secs(5), || {
        matches!(
            daemon.client().call(Request::Health),
            Ok(Response::Health(_))
        )
    });
    assert!(ok);
    drop(a);
}

#[test]
fn cancelling_a_queued_request_answers_at_once() {
    let model = tiny(Arch::Llama);
    let m = model.to_str().unwrap();
    // One request per worker: the second waits in the queue, not a batch.
    let daemon = TestDaemon::start(&["--prewarm", "1", "--max-workers", "1", "--batch", "1"]);
    let client = daemon.client();
    let g = |prompt: &str, n: u32| {
        let Request::Generate(g) = generate(m, prompt, n) else {
            unreachable!()
        };
        g
    };
    let mut running = client.generate(g("Busy worker", 4000)).unwrap();
    assert!(matches!(
        paraphym_tests::next_piece(&mut running),
        Some(Ok(paraphym_protocol::client::Piece::Token(_)))
    ));
    let queued = client.generate(g("Waiting", 8)).unwrap();
    queued.cancel().unwrap();
    let (text, stats) = queued.collect_text().unwrap();
    assert_eq!(stats.stop, StopReason::Cancelled);
    assert!(text.is_empty());
    // The generation ahead of it was still running when that answer came:
    // it too ends cancelled, not at its 4,000 tokens.
    running.cancel().unwrap();
    let (_, s) = running.collect_text().unwrap();
    assert_eq!(s.stop, StopReason::Cancelled);
    // Its id may be reused right away.
    still_serves(&daemon, m);
}
