//! Conversations on disk: one JSON file each under
//! `$XDG_DATA_HOME/paraphym/chats` (else `~/.local/share/paraphym/chats`),
//! named by creation time so a listing sorts newest first; Markdown exports.
//! Named sessions (`paraphym run --session NAME`) live beside them in
//! `sessions/NAME.json`, in the same format.

use std::path::{Path, PathBuf};

use crate::state::chat::Conversation;

fn data_dir() -> Option<PathBuf> {
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")))?;
    Some(data.join("paraphym"))
}

/// The chats folder (not created until the first save).
pub fn chats_dir() -> Option<PathBuf> {
    Some(data_dir()?.join("chats"))
}

/// The named sessions' folder (not created until the first save).
pub fn sessions_dir() -> Option<PathBuf> {
    Some(data_dir()?.join("sessions"))
}

/// A session's file: names are 1 to 64 of `A-Z a-z 0-9 . _ -`, not
/// starting with a dot (never a path).
fn session_file(dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a session name: {name:?} (1 to 64 letters, digits, '.', '_' or '-')"),
        ));
    }
    Ok(dir.join(format!("{name}.json")))
}

/// The session `name`, or `None` if it does not exist yet.
pub fn load_session(dir: &Path, name: &str) -> std::io::Result<Option<Conversation>> {
    let path = session_file(dir, name)?;
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("session {name}: {e}"),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn save_session(dir: &Path, name: &str, c: &Conversation) -> std::io::Result<()> {
    let path = session_file(dir, name)?;
    write_atomic(dir, &path, c)
}

/// A new chat id: the time in milliseconds, which sorts.
pub fn now_id() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
        .to_string()
}

/// A chat's id is a number: anything else (a path, `..`) is refused.
fn file(dir: &Path, id: &str) -> std::io::Result<PathBuf> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a chat id: {id:?}"),
        ));
    }
    Ok(dir.join(format!("{id}.json")))
}

/// Write atomically (a temporary file renamed over the old one), so a crash
/// mid-write never leaves half a chat. Empty chats are not saved.
pub fn save(dir: &Path, c: &Conversation) -> std::io::Result<()> {
    if c.messages.is_empty() {
        return Ok(());
    }
    write_atomic(dir, &file(dir, &c.id)?, c)
}

fn write_atomic(dir: &Path, path: &Path, c: &Conversation) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_vec_pretty(c).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

pub fn load(dir: &Path, id: &str) -> std::io::Result<Conversation> {
    let bytes = std::fs::read(file(dir, id)?)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("chat {id}: {e}"))
    })
}

/// (id, title) of every saved chat, newest first; unreadable files skipped.
pub fn list(dir: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut ids: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".json").map(str::to_owned)
        })
        .collect();
    ids.sort_by(|a, b| b.len().cmp(&a.len()).then(b.cmp(a)));
    ids.into_iter()
        .filter_map(|id| load(dir, &id).ok().map(|c| (id, c.title())))
        .collect()
}

/// Write the chat as Markdown into `dir`; the file's path.
pub fn export(dir: &Path, c: &Conversation) -> std::io::Result<PathBuf> {
    let id = if c.id.is_empty() {
        now_id()
    } else {
        c.id.clone()
    };
    let path = dir.join(format!("paraphym-chat-{id}.md"));
    std::fs::write(&path, c.to_markdown())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::chat::Message;

    #[test]
    fn saved_chats_list_newest_first_and_reopen() {
        let dir = std::env::temp_dir().join(format!("paraphym-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut a = Conversation::new("1000".into(), Some("m".into()));
        a.messages.push(Message::user("first chat"));
        let mut b = Conversation::new("2000".into(), None);
        b.messages.push(Message::user("second chat"));
        save(&dir, &a).unwrap();
        save(&dir, &b).unwrap();
        save(&dir, &Conversation::new("3000".into(), None)).unwrap();
        assert_eq!(
            list(&dir),
            [
                ("2000".into(), "second chat".into()),
                ("1000".into(), "first chat".into())
            ]
        );
        assert_eq!(load(&dir, "1000").unwrap(), a);
        assert!(load(&dir, "../x").is_err());
        let md = export(&dir, &a).unwrap();
        assert!(std::fs::read_to_string(md).unwrap().contains("first chat"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sessions_are_named_files_that_start_empty() {
        let dir = std::env::temp_dir().join(format!("paraphym-sessions-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(load_session(&dir, "work").unwrap(), None);
        let mut c = Conversation::new("work".into(), Some("m".into()));
        c.messages.push(Message::user("hello"));
        save_session(&dir, "work", &c).unwrap();
        assert_eq!(load_session(&dir, "work").unwrap(), Some(c.clone()));
        for bad in ["", ".hidden", "../x", "a/b", &"x".repeat(65)] {
            assert!(load_session(&dir, bad).is_err(), "{bad:?}");
            assert!(save_session(&dir, bad, &c).is_err(), "{bad:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
