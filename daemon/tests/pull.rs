//! Pulls against a local mock of the Hugging Face Hub: a small HTTP/1.1 server
//! with the Hub's resolve endpoint, `Range` support and its headers
//! (`x-repo-commit`, `x-linked-etag` = sha256, `content-range`), reached the way
//! users reach mirrors: through `HF_ENDPOINT`.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use paraphym_daemon::pull::{Hub, HubConfig, PullError};
use paraphym_daemon::registry::HubFile;
use sha2::{Digest, Sha256};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// How the mock serves one repository.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    /// The first body response stops halfway and drops the connection.
    DropOnce,
    /// The body is not what the etag promises.
    Corrupt,
    /// 401 unless a token is sent, 403 for the wrong token.
    Gated,
}

struct MockHub {
    endpoint: String,
    /// Every `Range` header the server saw, in order.
    ranges: Arc<Mutex<Vec<String>>>,
}

fn content(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

impl MockHub {
    fn start(mode: Mode, body: Vec<u8>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let seen = ranges.clone();
        let sha: String = Sha256::digest(&body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::thread::spawn(move || {
            let mut dropped = false;
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                serve(stream, mode, &body, &sha, &seen, &mut dropped);
            }
        });
        Self { endpoint, ranges }
    }

    fn ranges(&self) -> Vec<String> {
        self.ranges.lock().unwrap().clone()
    }
}

fn serve(
    mut stream: TcpStream,
    mode: Mode,
    body: &[u8],
    sha: &str,
    seen: &Mutex<Vec<String>>,
    dropped: &mut bool,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    let (mut range, mut auth) = (None, None);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        let (k, v) = line.split_once(':').unwrap_or((&line, ""));
        match k.to_ascii_lowercase().as_str() {
            "range" => range = Some(v.trim().to_owned()),
            "authorization" => auth = Some(v.trim().to_owned()),
            _ => {}
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("").to_owned();
    let reply =
        |stream: &mut TcpStream, status: &str, headers: &[(String, String)], data: &[u8]| {
            let mut head = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(data);
        };
    if !path.starts_with("/org/model-GGUF/resolve/main/") {
        return reply(
            &mut stream,
            "404 Not Found",
            &[("content-length".into(), "0".into())],
            b"",
        );
    }
    if mode == Mode::Gated && auth.as_deref() != Some("Bearer good-token") {
        let status = if auth.is_none() {
            "401 Unauthorized"
        } else {
            "403 Forbidden"
        };
        return reply(
            &mut stream,
            status,
            &[("content-length".into(), "0".into())],
            b"",
        );
    }
    if !path.ends_with("/model.gguf") {
        return reply(
            &mut stream,
            "404 Not Found",
            &[("content-length".into(), "0".into())],
            b"",
        );
    }
    let range = range.unwrap_or_else(|| "bytes=0-".into());
    seen.lock().unwrap().push(range.clone());
    let spec = range.trim_start_matches("bytes=");
    let (a, b) = spec.split_once('-').unwrap();
    let start: usize = a.parse().unwrap();
    let end: usize = if b.is_empty() {
        body.len() - 1
    } else {
        b.parse().unwrap()
    };
    if start >= body.len() {
        return reply(
            &mut stream,
            "416 Range Not Satisfiable",
            &[("content-length".into(), "0".into())],
            b"",
        );
    }
    let mut data = body[start..=end].to_vec();
    if mode == Mode::Corrupt && end > 0 {
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
    }
    let headers = vec![
        ("x-repo-commit".to_owned(), COMMIT.to_owned()),
        ("x-linked-etag".to_owned(), format!("\"{sha}\"")),
        ("x-linked-size".to_owned(), body.len().to_string()),
        (
            "content-range".to_owned(),
            format!("bytes {start}-{end}/{}", body.len()),
        ),
        ("content-length".to_owned(), data.len().to_string()),
    ];
    if mode == Mode::DropOnce && !*dropped && end > 0 {
        // Promise the whole rest, send half of it, hang up.
        *dropped = true;
        reply(
            &mut stream,
            "206 Partial Content",
            &headers,
            &data[..data.len() / 2],
        );
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return;
    }
    reply(&mut stream, "206 Partial Content", &headers, &data);
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("paraphym-pull-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A hub handle configured the way users configure one: through the
/// environment (`HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`). The
/// variables are process-wide, so setting and reading them is serialised.
fn hub(endpoint: &str, home: &Scratch, token: Option<&str>, offline: bool) -> Hub {
    static ENV: Mutex<()> = Mutex::new(());
    let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("HF_ENDPOINT", endpoint);
    std::env::set_var("HF_HOME", &home.0);
    std::env::remove_var("HF_HUB_CACHE");
    match token {
        Some(t) => std::env::set_var("HF_TOKEN", t),
        None => std::env::remove_var("HF_TOKEN"),
    }
    if offline {
        std::env::set_var("HF_HUB_OFFLINE", "1");
    } else {
        std::env::remove_var("HF_HUB_OFFLINE");
    }
    let config = HubConfig::from_env();
    assert_eq!(config.endpoint, endpoint);
    assert_eq!(config.cache_dir, home.0.join("hub"));
    assert_eq!(config.offline, offline);
    Hub::new(config).unwrap()
}

fn file(name: &str) -> HubFile {
    HubFile {
        repo: "org/model-GGUF".into(),
        file: name.into(),
        revision: "main".into(),
    }
}

#[test]
fn a_full_pull_lands_in_the_cache_and_is_reused() {
    let body = content(3 << 20);
    let mock = MockHub::start(Mode::Normal, body.clone());
    let cache = Scratch::new("full");
    let h = hub(&mock.endpoint, &cache, None, false);
    assert!(h.cached(&file("model.gguf")).is_none());
    let path = h.pull(&file("model.gguf"), ()).unwrap();
    assert!(path.starts_with(cache.0.join("hub/models--org--model-GGUF/snapshots")));
    assert_eq!(std::fs::read(&path).unwrap(), body);
    let requests = mock.ranges().len();
    // Pulled again: straight from the cache, no request.
    assert_eq!(h.pull(&file("model.gguf"), ()).unwrap(), path);
    assert_eq!(mock.ranges().len(), requests);
    // And offline, too.
    let offline = hub("http://127.0.0.1:9", &cache, None, true);
    assert_eq!(offline.pull(&file("model.gguf"), ()).unwrap(), path);
}

#[test]
fn an_interrupted_pull_resumes_where_it_stopped() {
    let body = content(4 << 20);
    let mock = MockHub::start(Mode::DropOnce, body.clone());
    let cache = Scratch::new("resume");
    let h = hub(&mock.endpoint, &cache, None, false);
    let err = h.pull(&file("model.gguf"), ()).unwrap_err();
    assert!(err.to_string().contains("resumes"), "{err}");
    assert!(h.cached(&file("model.gguf")).is_none());
    let path = h.pull(&file("model.gguf"), ()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
    let ranges = mock.ranges();
    let resumed = ranges
        .iter()
        .filter_map(|r| r.strip_prefix("bytes="))
        .filter_map(|r| r.strip_suffix('-'))
        .filter_map(|s| s.parse::<usize>().ok())
        .any(|start| start > 0);
    assert!(resumed, "no resumed range request in {ranges:?}");
}

#[test]
fn a_corrupt_pull_is_rejected_and_deleted() {
    let mock = MockHub::start(Mode::Corrupt, content(1 << 20));
    let cache = Scratch::new("corrupt");
    let h = hub(&mock.endpoint, &cache, None, false);
    let err = h.pull(&file("model.gguf"), ()).unwrap_err();
    assert!(matches!(err, PullError::Corrupt { .. }), "{err}");
    assert!(
        h.cached(&file("model.gguf")).is_none(),
        "a corrupt file stayed in the cache"
    );
}

#[test]
fn offline_without_a_cached_copy_says_what_to_do() {
    let cache = Scratch::new("offline");
    let h = hub("http://127.0.0.1:9", &cache, None, true);
    let err = h.pull(&file("model.gguf"), ()).unwrap_err();
    assert!(matches!(err, PullError::NotCached { .. }), "{err}");
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn gated_missing_and_unreachable_errors_are_clear() {
    let mock = MockHub::start(Mode::Gated, content(1 << 16));
    let cache = Scratch::new("gated");
    let err = hub(&mock.endpoint, &cache, None, false)
        .pull(&file("model.gguf"), ())
        .unwrap_err();
    assert!(matches!(err, PullError::NeedsToken { .. }), "{err}");
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");
    let err = hub(&mock.endpoint, &cache, Some("bad-token"), false)
        .pull(&file("model.gguf"), ())
        .unwrap_err();
    assert!(matches!(err, PullError::Forbidden { .. }), "{err}");
    let ok = hub(&mock.endpoint, &cache, Some("good-token"), false)
        .pull(&file("model.gguf"), ())
        .unwrap();
    assert!(ok.is_file());
    let err = hub(&mock.endpoint, &cache, Some("good-token"), false)
        .pull(&file("other.gguf"), ())
        .unwrap_err();
    assert!(matches!(err, PullError::NotFound { .. }), "{err}");
    // Nothing listens on port 9 (discard) here.
    let err = hub("http://127.0.0.1:9", &Scratch::new("down"), None, false)
        .pull(&file("model.gguf"), ())
        .unwrap_err();
    assert!(matches!(err, PullError::Unreachable { .. }), "{err}");
}
