//! The terminal: raw mode, the alternate screen, mouse and bracketed paste
//! on; restored by a Drop guard and by a panic hook, so neither an error nor
//! a panic leaves the user's terminal broken.

use std::io::stdout;

use ratatui::crossterm::event::{
    DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture,
};
use ratatui::crossterm::execute;
use ratatui::DefaultTerminal;

pub struct Term {
    pub terminal: DefaultTerminal,
}

fn restore() {
    let _ = execute!(stdout(), DisableMouseCapture, DisableBracketedPaste);
    ratatui::restore();
}

impl Term {
    pub fn start() -> std::io::Result<Self> {
        // ratatui::init's own hook restores raw mode and the screen; ours
        // runs first and also turns mouse reporting off.
        let terminal = ratatui::try_init()?;
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = execute!(stdout(), DisableMouseCapture, DisableBracketedPaste);
            previous(info);
        }));
        let term = Self { terminal };
        // Past this point an error drops `term`, which restores the screen.
        execute!(stdout(), EnableMouseCapture, EnableBracketedPaste)?;
        Ok(term)
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        restore();
    }
}

/// Put `text` on the clipboard through the terminal (OSC 52): works over
/// SSH and in tmux (with `set-clipboard on`), no clipboard tool needed.
pub fn copy(text: &str) -> std::io::Result<()> {
    use base64::Engine as _;
    use std::io::Write;
    let b64 = base64::engine::general_purpose::STANDARD.encode(text);
    let mut out = stdout();
    write!(out, "\x1b]52;c;{b64}\x07")?;
    out.flush()
}
