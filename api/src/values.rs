//! Values that validate themselves as they are read: a document that parses
//! holds only values in range, and a value out of range is refused by the
//! parser with the field path it sits at (`runtime.hook-deadline: must be
//! between 1ms and 10s, not "20s"`), never by hand-written checks later.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use wasmesh_units::{format_duration, format_size, parse_duration, parse_size};

fn range_text(min: String, max: String, unbounded: bool) -> String {
    if unbounded {
        format!("at least {min}")
    } else {
        format!("between {min} and {max}")
    }
}

/// A duration between `MIN_MS` and `MAX_MS` milliseconds (inclusive),
/// written as [`wasmesh_units::parse_duration`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct BoundedDuration<const MIN_MS: u64, const MAX_MS: u64>(Duration);

impl<const MIN_MS: u64, const MAX_MS: u64> BoundedDuration<MIN_MS, MAX_MS> {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl<const MIN_MS: u64, const MAX_MS: u64> TryFrom<String> for BoundedDuration<MIN_MS, MAX_MS> {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let d = parse_duration(&text)?;
        let (min, max) = (Duration::from_millis(MIN_MS), Duration::from_millis(MAX_MS));
        if d < min || d > max {
            return Err(format!(
                "must be {}, not {text:?}",
                range_text(
                    format_duration(min),
                    format_duration(max),
                    MAX_MS == u64::MAX
                )
            ));
        }
        Ok(Self(d))
    }
}

/// A size in bytes between `MIN` and `MAX` (inclusive), written as
/// [`wasmesh_units::parse_size`] reads it (`16Mi`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "SizeText")]
pub struct BoundedSize<const MIN: u64, const MAX: u64>(u64);

/// A size as written: text (`16Mi`) or a plain number of bytes.
#[derive(Deserialize)]
#[serde(untagged)]
enum SizeText {
    Bytes(u64),
    Text(String),
}

impl<const MIN: u64, const MAX: u64> BoundedSize<MIN, MAX> {
    /// The size, in bytes.
    pub fn get(self) -> u64 {
        self.0
    }

    /// Read a size as written (`16Mi`), checking its range.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::try_from(SizeText::Text(text.to_string()))
    }
}

impl<const MIN: u64, const MAX: u64> TryFrom<SizeText> for BoundedSize<MIN, MAX> {
    type Error = String;
    fn try_from(t: SizeText) -> Result<Self, String> {
        let (n, text) = match t {
            SizeText::Bytes(n) => (n, n.to_string()),
            SizeText::Text(s) => (parse_size(&s)?, s),
        };
        if !(MIN..=MAX).contains(&n) {
            return Err(format!(
                "must be {}, not {text:?}",
                range_text(format_size(MIN), format_size(MAX), MAX == u64::MAX)
            ));
        }
        Ok(Self(n))
    }
}

/// A whole number between `MIN` and `MAX` (inclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "u64")]
pub struct Count<const MIN: u64, const MAX: u64>(u64);

impl<const MIN: u64, const MAX: u64> Count<MIN, MAX> {
    /// The number.
    pub fn get(self) -> usize {
        self.0 as usize
    }
}

impl<const MIN: u64, const MAX: u64> TryFrom<u64> for Count<MIN, MAX> {
    type Error = String;
    fn try_from(n: u64) -> Result<Self, String> {
        if !(MIN..=MAX).contains(&n) {
            return Err(format!(
                "must be {}, not {n}",
                range_text(MIN.to_string(), MAX.to_string(), MAX == u64::MAX)
            ));
        }
        Ok(Self(n))
    }
}

/// A socket address, `ip:port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Address(pub SocketAddr);

impl TryFrom<String> for Address {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
            .map(Self)
            .map_err(|_| format!("{text:?} is not an address; write ip:port, e.g. 127.0.0.1:9081"))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $max:expr, $allowed:expr, $what:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        impl $name {
            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                let allowed: fn(u8) -> bool = $allowed;
                if s.is_empty() || s.len() > $max || !s.bytes().all(allowed) {
                    return Err(format!("{s:?}: {}", $what));
                }
                Ok(Self(s))
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A service's name: letters, digits, `-`, `.` or `_` (at most 253).
    ServiceName,
    253,
    |b| b.is_ascii_alphanumeric() || b"-._".contains(&b),
    "a service name is 1-253 letters, digits, '-', '.' or '_'"
);

name_type!(
    /// A plugin's name in a chain: letters, digits, `-`, `_` or `.` (at most 64).
    PluginName,
    64,
    |b| b.is_ascii_alphanumeric() || b"-_.".contains(&b),
    "a plugin name is 1-64 letters, digits, '-', '_' or '.'"
);

name_type!(
    /// An extra host name of a service, with or without a port
    /// (`reviews.example.com`, `r.local:8080`, `[::1]:80`).
    HostName,
    255,
    |b| b.is_ascii_graphic() && !b"/?#@".contains(&b),
    "not a host name: write a name or address, with or without a port (no spaces, '/', '?', '#' or '@')"
);

name_type!(
    /// A subset's name (`v1`): letters, digits, `-`, `.` or `_`.
    SubsetName,
    63,
    |b| b.is_ascii_alphanumeric() || b"-._".contains(&b),
    "a subset name is 1-63 letters, digits, '-', '.' or '_'"
);

/// A sha256, as 64 hex digits (either case).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Sha256(String);

impl Sha256 {
    /// Lowercase hex.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Sha256 {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{s:?} is not a sha256: write 64 hex digits"));
        }
        Ok(Self(s.to_ascii_lowercase()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_out_of_range_say_the_range() {
        type Deadline = BoundedDuration<1, 10_000>;
        assert_eq!(
            Deadline::try_from("10ms".to_string()).unwrap().get(),
            Duration::from_millis(10)
        );
        let e = Deadline::try_from("20s".to_string()).unwrap_err();
        assert_eq!(e, "must be between 1ms and 10s, not \"20s\"");
        type Memory = BoundedSize<{ 1 << 20 }, { 4 << 30 }>;
        let e = Memory::try_from(SizeText::Text("512Ki".into())).unwrap_err();
        assert_eq!(e, "must be between 1Mi and 4Gi, not \"512Ki\"");
        assert_eq!(
            Memory::try_from(SizeText::Bytes(1 << 20)).unwrap().get(),
            1 << 20
        );
        let e = Count::<1, { u64::MAX }>::try_from(0).unwrap_err();
        assert_eq!(e, "must be at least 1, not 0");
        assert!(ServiceName::try_from("re views".to_string()).is_err());
        assert!(PluginName::try_from("x".repeat(65)).is_err());
        assert_eq!(
            Sha256::try_from("AB".repeat(32)).unwrap().as_str(),
            "ab".repeat(32)
        );
    }
}
