//! Checks on what a client sends, applied at the door before a job is accepted.
//!
//! A name travels far: into libvirt's domain metadata, the hosts' logs, the CLI's tables and a
//! terminal. Accepting a NUL, an escape sequence or ten thousand characters only to fail at
//! libvirt (or to paint someone's terminal) helps nobody, so a name is at most
//! [`MAX_NAME_CHARS`] characters with no control characters, and the error names the field.
//! Texts quoted back in error messages go through [`printable`], so an error never carries
//! raw control characters either.

use crate::error::ApiError;

/// The longest name accepted, in characters (ZStack's column is 255 wide).
pub const MAX_NAME_CHARS: usize = 255;

/// The longest description accepted, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 2048;

/// Checks a resource's name: not blank, at most [`MAX_NAME_CHARS`] characters, no control
/// characters and no `/` (names become file and domain metadata on hosts).
pub fn name(field: &str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::invalid(field, format!("`{field}` must not be empty")));
    }
    text(field, value, MAX_NAME_CHARS)?;
    if value.contains('/') {
        return Err(ApiError::invalid(field, format!("`{field}` must not contain `/`")));
    }
    Ok(())
}

/// Checks a free text (a description): at most `max` characters, no control characters
/// but tabs and line ends.
pub fn text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    let count = value.chars().count();
    if count > max {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` has {count} characters; at most {max} are accepted"),
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` contains the control character U+{:04X}", c as u32),
        ));
    }
    Ok(())
}

/// `text` made safe to quote in a message or a log: control characters escaped, cut at 64
/// characters.
pub fn printable(text: &str) -> String {
    let mut out: String = text.chars().take(64).flat_map(char::escape_default).collect();
    if text.chars().count() > 64 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refuse_what_would_fail_later() {
        assert!(name("name", "web-1").is_ok());
        assert!(name("name", "ünïcode ok").is_ok());
        for bad in ["", "  ", "a\0b", "a/b", "\u{1b}[31mred", &"x".repeat(256)] {
            let error = name("name", bad).unwrap_err();
            assert_eq!(error.details["field"], "name", "{bad:?}");
        }
        assert!(name("name", &"é".repeat(255)).is_ok());
    }

    #[test]
    fn printable_escapes_and_cuts() {
        assert_eq!(printable("a\u{1b}b"), "a\\u{1b}b");
        assert_eq!(printable(&"y".repeat(100)).chars().count(), 65);
    }
}
