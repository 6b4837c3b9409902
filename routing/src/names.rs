//! Channel and group names: the ASGI 1.0 grammar, checked at every boundary.
//!
//! Channel names match `^[a-zA-Z0-9\-_.]+((\?|!)[\w\-_.]*)?$` and are under 100 characters; group
//! names match `^[a-zA-Z0-9\-_.]+$`. A name containing `!` is process-local: the part up to and
//! including the `!` names one process's inbox. A bad name is an error value, never a panic.

use thiserror::Error;

/// Names must be shorter than this (asgiref: `len(name) < 100`).
pub const MAX_NAME_LENGTH: usize = 100;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{kind} name is empty")]
    Empty {
        /// "channel" or "group".
        kind: &'static str,
    },
    /// The name is 100 characters or longer.
    #[error("{kind} name {name:?} is {len} characters long; names must be under {MAX_NAME_LENGTH}")]
    TooLong {
        /// "channel" or "group".
        kind: &'static str,
        /// The name, cut to 120 characters.
        name: String,
        /// Its length.
        len: usize,
    },
    /// A character outside the grammar.
    #[error(
        "{kind} name {name:?} has an invalid character {ch:?} at {at}; allowed: ASCII letters, digits, '-', '_', '.'{extra}"
    )]
    InvalidCharacter {
        /// "channel" or "group".
        kind: &'static str,
        /// The name.
        name: String,
        /// The offending character.
        ch: char,
        /// Its byte offset.
        at: usize,
        /// What else the kind allows.
        extra: &'static str,
    },
    /// A `?` name that ends at the `?` (single-reader names need a local part).
    #[error("single-reader channel name {0:?} must not end with '?'")]
    EmptySingleReader(String),
    /// A receive on a `!` name with a local part: only the inbox (up to the `!`) can be received.
    #[error(
        "process-local channel {0:?} cannot be received directly; receive on its inbox (the name up to and including '!')"
    )]
    LocalPartInReceive(String),
    /// `new_channel` pattern that does not end in `?` or `!`.
    #[error("new_channel pattern {0:?} must end with '?' or '!'")]
    BadPattern(String),
}

fn is_base_char(c: char) -> bool {
    c.is_ascii() && NAME_BYTES[c as usize]
}

fn check_length(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    let len = if name.is_ascii() {
        name.len()
    } else {
        name.chars().count()
    };
    if len >= MAX_NAME_LENGTH {
        return Err(NameError::TooLong {
            kind,
            name: name.chars().take(120).collect(),
            len,
        });
    }
    Ok(())
}

/// Checks a channel name for `send` (a `!` name may carry its local part).
pub fn validate_channel(name: &str) -> Result<(), NameError> {
    check_length("channel", name)?;
    // Names are checked on every send (twice for a reply: by the consumer and by the layer), so
    // the usual ASCII name is walked by bytes (no char decoding), through the same rule.
    let mut seen_marker = false;
    let bad = if name.is_ascii() {
        name.bytes()
            .map(char::from)
            .enumerate()
            .find(|&(at, ch)| !channel_char_ok(at, ch, &mut seen_marker))
    } else {
        name.char_indices()
            .find(|&(at, ch)| !channel_char_ok(at, ch, &mut seen_marker))
    };
    if let Some((at, ch)) = bad {
        return Err(NameError::InvalidCharacter {
            kind: "channel",
            name: name.to_owned(),
            ch,
            at,
            extra: ", and one '!' or '?' after the first character",
        });
    }
    if name.ends_with('?') {
        return Err(NameError::EmptySingleReader(name.to_owned()));
    }
    Ok(())
}

/// The ASCII letters, digits, `-`, `_` and `.` of a name, as a table: one load per character.
static NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        table[byte] = b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.';
        byte += 1;
    }
    table
};

/// Whether `ch` at byte `at` may stand in a channel name, given whether the `!` or `?` marker
/// came before it (which it records).
#[inline]
fn channel_char_ok(at: usize, ch: char, seen_marker: &mut bool) -> bool {
    if is_base_char(ch) {
        true
    } else if *seen_marker {
        // `\w` in Python 3 is Unicode-aware; we accept the same.
        ch.is_alphanumeric()
    } else if (ch == '!' || ch == '?') && at > 0 {
        *seen_marker = true;
        true
    } else {
        false
    }
}

/// Checks a channel name for `receive`: as [`validate_channel`], and a `!` name must end at the `!`.
pub fn validate_receive_channel(name: &str) -> Result<(), NameError> {
    validate_channel(name)?;
    if let Some(i) = name.find('!')
        && i + 1 != name.len()
    {
        return Err(NameError::LocalPartInReceive(name.to_owned()));
    }
    Ok(())
}

/// Checks a group name.
pub fn validate_group(name: &str) -> Result<(), NameError> {
    check_length("group", name)?;
    for (at, ch) in name.char_indices() {
        if !is_base_char(ch) {
            return Err(NameError::InvalidCharacter {
                kind: "group",
                name: name.to_owned(),
                ch,
                at,
                extra: "",
            });
        }
    }
    Ok(())
}

/// The part of a channel name up to and including `!`, or the whole name.
pub fn non_local_name(name: &str) -> &str {
    match name.find('!') {
        Some(i) => &name[..=i],
        None => name,
    }
}

/// True for process-local (`!`) names.
pub fn is_process_local(name: &str) -> bool {
    name.contains('!')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_asgi_grammar() {
        for ok in [
            "http.request",
            "websocket.receive",
            "a-b_c.d",
            "daphne.response.ABCDEFGHIJ!klmnopq",
            "inbox!",
            "http.request.body?abc",
            "x!ünï",
        ] {
            assert_eq!(validate_channel(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_bad_names_with_a_reason() {
        assert!(matches!(validate_channel(""), Err(NameError::Empty { .. })));
        assert!(matches!(
            validate_channel(&"a".repeat(100)),
            Err(NameError::TooLong { len: 100, .. })
        ));
        assert_eq!(validate_channel(&"a".repeat(99)), Ok(()));
        assert!(matches!(
            validate_channel("a b"),
            Err(NameError::InvalidCharacter { ch: ' ', at: 1, .. })
        ));
        assert!(matches!(
            validate_channel("a!b!c"),
            Err(NameError::InvalidCharacter { ch: '!', .. })
        ));
        assert!(matches!(
            validate_channel("!abc"),
            Err(NameError::InvalidCharacter { ch: '!', at: 0, .. })
        ));
        assert!(matches!(
            validate_channel("chän"),
            Err(NameError::InvalidCharacter {
                ch: 'ä', at: 2, ..
            })
        ));
        // Non-ASCII names are measured in characters, as Python's len() does, not in bytes.
        assert_eq!(validate_channel(&format!("x!{}", "ü".repeat(97))), Ok(()));
        assert!(matches!(
            validate_channel(&format!("x!{}", "ü".repeat(98))),
            Err(NameError::TooLong { len: 100, .. })
        ));
        assert_eq!(
            validate_channel("abc?"),
            Err(NameError::EmptySingleReader("abc?".into()))
        );
        assert_eq!(
            validate_receive_channel("abc!def"),
            Err(NameError::LocalPartInReceive("abc!def".into()))
        );
        assert_eq!(validate_receive_channel("abc!"), Ok(()));
        assert!(validate_group("room-1.a_b").is_ok());
        assert!(matches!(
            validate_group("room!x"),
            Err(NameError::InvalidCharacter { ch: '!', .. })
        ));
        let msg = validate_channel("a b").unwrap_err().to_string();
        assert!(msg.contains("invalid character ' '"), "{msg}");
    }

    #[test]
    fn non_local_part() {
        assert_eq!(non_local_name("a.b!c"), "a.b!");
        assert_eq!(non_local_name("a.b"), "a.b");
        assert!(is_process_local("a!"));
    }
}
