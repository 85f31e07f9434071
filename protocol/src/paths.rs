//! Where the daemon's socket lives. The folder's name carries the protocol
//! version, so daemons speaking different versions never share a socket.

use std::path::{Path, PathBuf};

use crate::PROTOCOL_VERSION;

/// Overrides the socket path (the folder is created 0700 if missing).
pub const SOCKET_ENV: &str = "PARAPHYM_SOCKET";

/// The socket's file name inside its folder.
pub const SOCKET_FILE: &str = "paraphymd.sock";

/// `paraphym-v{PROTOCOL_VERSION}`.
pub fn versioned_dir_name() -> String {
    format!("paraphym-v{PROTOCOL_VERSION}")
}

/// The socket path: `$PARAPHYM_SOCKET`, else
/// `$XDG_RUNTIME_DIR/paraphym-v5/paraphymd.sock`, else
/// `~/.paraphym/paraphym-v5/paraphymd.sock`.
pub fn default_socket() -> Option<PathBuf> {
    socket_from(&|k| std::env::var_os(k).filter(|v| !v.is_empty()))
}

/// [`default_socket`] with the environment passed in (tests).
pub fn socket_from(env: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    if let Some(p) = env(SOCKET_ENV) {
        return Some(PathBuf::from(p));
    }
    let base = match env("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        _ => PathBuf::from(env("HOME")?).join(".paraphym"),
    };
    Some(base.join(versioned_dir_name()).join(SOCKET_FILE))
}

/// Sockets of daemons speaking other protocol versions next to `socket`'s
/// folder (`paraphym-v*` siblings that hold a socket file), so a client can
/// say that one is running but unusable.
pub fn other_version_sockets(socket: &Path) -> Vec<PathBuf> {
    let Some(dir) = socket.parent() else {
        return Vec::new();
    };
    if dir.file_name().and_then(|n| n.to_str()) != Some(versioned_dir_name().as_str()) {
        return Vec::new();
    }
    let Some(base) = dir.parent() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("paraphym-v") && *name != versioned_dir_name()
        })
        .map(|e| e.path().join(SOCKET_FILE))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn override_then_runtime_dir_then_home() {
        let v = versioned_dir_name();
        assert_eq!(
            socket_from(&env(&[("PARAPHYM_SOCKET", "/s/x.sock"), ("HOME", "/h")])),
            Some(PathBuf::from("/s/x.sock"))
        );
        assert_eq!(
            socket_from(&env(&[("XDG_RUNTIME_DIR", "/run/user/7"), ("HOME", "/h")])),
            Some(PathBuf::from(format!("/run/user/7/{v}/paraphymd.sock")))
        );
        // A relative runtime dir is ignored, as the XDG spec asks.
        assert_eq!(
            socket_from(&env(&[("XDG_RUNTIME_DIR", "rel"), ("HOME", "/h")])),
            Some(PathBuf::from(format!("/h/.paraphym/{v}/paraphymd.sock")))
        );
        assert_eq!(socket_from(&env(&[])), None);
        assert!(v.ends_with(&PROTOCOL_VERSION.to_string()));
    }
}
