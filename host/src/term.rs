//! Text from others — file names from the partner, reasons and reports from boxes — on an
//! operator's terminal.

use std::borrow::Cow;

/// `text` with every control character other than newline and tab, and the bidirectional
/// overrides, written as an escape (`\u{1b}`): a file name or a reason from a peer cannot
/// move the cursor, rename the window, hide a line or reorder what the operator reads.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(hidden) {
        return Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if hidden(c) {
            shown.extend(c.escape_unicode());
        } else {
            shown.push(c);
        }
    }
    Cow::Owned(shown)
}

fn hidden(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `println!` for lines that may hold what a peer sent: through [`printable`].
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        ::std::println!("{}", $crate::term::printable(&::std::format!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_cursor_title_and_reordering_but_keeps_lines_and_text() {
        assert!(matches!(
            printable("voicemail/INBOX/msg0001.wav"),
            Cow::Borrowed(_)
        ));
        assert_eq!(printable("a\nb\tc — ü"), "a\nb\tc — ü");
        assert_eq!(
            printable("x\u{1b}]0;owned\u{7}\u{1b}[2Jy\r"),
            "x\\u{1b}]0;owned\\u{7}\\u{1b}[2Jy\\u{d}"
        );
        assert_eq!(
            printable("\u{9b}31m \u{202e}vaw.exe"),
            "\\u{9b}31m \\u{202e}vaw.exe"
        );
        assert_eq!(printable("del\u{7f}"), "del\\u{7f}");
    }
}
