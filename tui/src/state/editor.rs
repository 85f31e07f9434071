//! The input editor: multi-line text with a cursor. Written here rather than
//! taken from a crate because the editor crates for ratatui lag its releases
//! (tui-textarea 0.7 targets ratatui 0.29); what a chat input needs is small.

/// Text as lines of chars, a cursor (row, column in chars).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Editor {
    lines: Vec<Vec<char>>,
    row: usize,
    col: usize,
}

impl Default for Editor {
    fn default() -> Self {
        Self {
            lines: vec![Vec::new()],
            row: 0,
            col: 0,
        }
    }
}

impl Editor {
    pub fn text(&self) -> String {
        self.lines
            .iter()
            .map(|l| l.iter().collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn is_empty(&self) -> bool {
        self.lines.len() == 1 && self.lines[0].is_empty()
    }

    pub fn lines(&self) -> impl Iterator<Item = String> + '_ {
        self.lines.iter().map(|l| l.iter().collect())
    }

    /// (row, column in chars).
    pub fn cursor(&self) -> (usize, usize) {
        (self.row, self.col)
    }

    /// Replace the text, cursor at its end.
    pub fn set_text(&mut self, text: &str) {
        self.lines = text.split('\n').map(|l| l.chars().collect()).collect();
        self.row = self.lines.len() - 1;
        self.col = self.lines[self.row].len();
    }

    /// Take the text out, leaving the editor empty.
    pub fn take(&mut self) -> String {
        let t = self.text();
        *self = Self::default();
        t
    }

    pub fn insert(&mut self, c: char) {
        if c == '\n' {
            return self.newline();
        }
        if c == '\t' {
            // Tabs as spaces: a tab has no width the screen agrees on.
            for _ in 0..4 {
                self.insert(' ');
            }
            return;
        }
        if c == '\r' || (c.is_control() && c != '\t') {
            return;
        }
        self.lines[self.row].insert(self.col, c);
        self.col += 1;
    }

    /// Paste: `\n`, `\r\n` and a lone `\r` (what many terminals send for
    /// a pasted newline) become line breaks.
    pub fn insert_str(&mut self, s: &str) {
        for c in s.replace("\r\n", "\n").replace('\r', "\n").chars() {
            self.insert(c);
        }
    }

    pub fn newline(&mut self) {
        let rest = self.lines[self.row].split_off(self.col);
        self.lines.insert(self.row + 1, rest);
        self.row += 1;
        self.col = 0;
    }

    pub fn backspace(&mut self) {
        if self.col > 0 {
            self.col -= 1;
            self.lines[self.row].remove(self.col);
        } else if self.row > 0 {
            let line = self.lines.remove(self.row);
            self.row -= 1;
            self.col = self.lines[self.row].len();
            self.lines[self.row].extend(line);
        }
    }

    pub fn delete(&mut self) {
        if self.col < self.lines[self.row].len() {
            self.lines[self.row].remove(self.col);
        } else if self.row + 1 < self.lines.len() {
            let next = self.lines.remove(self.row + 1);
            self.lines[self.row].extend(next);
        }
    }

    /// Delete the word before the cursor (Ctrl+W, as in shells).
    pub fn delete_word(&mut self) {
        if self.col == 0 {
            return self.backspace();
        }
        let line = &mut self.lines[self.row];
        let mut start = self.col;
        while start > 0 && line[start - 1].is_whitespace() {
            start -= 1;
        }
        while start > 0 && !line[start - 1].is_whitespace() {
            start -= 1;
        }
        line.drain(start..self.col);
        self.col = start;
    }

    pub fn left(&mut self) {
        if self.col > 0 {
            self.col -= 1;
        } else if self.row > 0 {
            self.row -= 1;
            self.col = self.lines[self.row].len();
        }
    }

    pub fn right(&mut self) {
        if self.col < self.lines[self.row].len() {
            self.col += 1;
        } else if self.row + 1 < self.lines.len() {
            self.row += 1;
            self.col = 0;
        }
    }

    /// Up a line; false at the first line (the caller may use the key).
    pub fn up(&mut self) -> bool {
        if self.row == 0 {
            return false;
        }
        self.row -= 1;
        self.col = self.col.min(self.lines[self.row].len());
        true
    }

    /// Down a line; false at the last line.
    pub fn down(&mut self) -> bool {
        if self.row + 1 >= self.lines.len() {
            return false;
        }
        self.row += 1;
        self.col = self.col.min(self.lines[self.row].len());
        true
    }

    pub fn home(&mut self) {
        self.col = 0;
    }

    pub fn end(&mut self) {
        self.col = self.lines[self.row].len();
    }
}

#[cfg(test)]
mod tests {
    use super::Editor;

    #[test]
    fn typing_newlines_and_deleting() {
        let mut e = Editor::default();
        e.insert_str("hel\rlo\r\nworld");
        assert_eq!(e.text(), "hel\nlo\nworld");
        e = Editor::default();
        e.insert_str("hello\r\nworld");
        assert_eq!(e.text(), "hello\nworld");
        assert_eq!(e.cursor(), (1, 5));
        e.home();
        e.backspace();
        assert_eq!(e.text(), "helloworld");
        assert_eq!(e.cursor(), (0, 5));
        e.newline();
        e.insert('!');
        assert_eq!(e.text(), "hello\n!world");
        e.end();
        e.insert_str(" two words");
        e.delete_word();
        assert_eq!(e.text(), "hello\n!world two ");
        assert!(e.up());
        assert!(!e.up());
        e.end();
        e.delete();
        assert_eq!(e.text(), "hello!world two ");
        assert_eq!(e.take(), "hello!world two ");
        assert!(e.is_empty());
    }

    #[test]
    fn cursor_moves_across_lines_and_clamps() {
        let mut e = Editor::default();
        e.set_text("a long line\nab");
        assert_eq!(e.cursor(), (1, 2));
        e.up();
        assert_eq!(e.cursor(), (0, 2));
        e.end();
        e.right();
        assert_eq!(e.cursor(), (1, 0));
        e.left();
        assert_eq!(e.cursor(), (0, 11));
        e.down();
        assert_eq!(e.cursor(), (1, 2), "clamped to the shorter line");
    }
}
