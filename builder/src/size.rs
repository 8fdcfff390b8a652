//! Byte sizes written the way people write them in config files: "512MiB", "2GiB", "4096".

use std::fmt;

use serde::{Deserialize, Deserializer};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// `b` bytes for people: "612.3 MiB".
pub fn approx(b: u64) -> String {
    let units = [("GiB", GIB), ("MiB", MIB), ("KiB", KIB)];
    for (name, u) in units {
        if b >= u {
            return format!("{:.1} {name}", b as f64 / u as f64);
        }
    }
    format!("{b} B")
}

/// A size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Bytes(pub u64);

impl Bytes {
    pub fn parse(s: &str) -> Result<Bytes, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("`{s}` is not a size; write for example \"512MiB\" or \"2GiB\"")
        })?;
        let mult = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" => KIB,
            "M" | "MiB" => MIB,
            "G" | "GiB" => GIB,
            "T" | "TiB" => 1024 * GIB,
            other => {
                return Err(format!(
                    "unknown unit `{other}` in `{s}`; use B, KiB, MiB, GiB or TiB"
                ))
            }
        };
        n.checked_mul(mult)
            .map(Bytes)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= GIB && b.is_multiple_of(GIB) {
            write!(f, "{}GiB", b / GIB)
        } else if b >= MIB && b.is_multiple_of(MIB) {
            write!(f, "{}MiB", b / MIB)
        } else if b >= KIB && b.is_multiple_of(KIB) {
            write!(f, "{}KiB", b / KIB)
        } else {
            write!(f, "{b}B")
        }
    }
}

impl std::str::FromStr for Bytes {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Bytes::parse(s)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Bytes(n)),
            Raw::Str(s) => Bytes::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(Bytes::parse("512MiB"), Ok(Bytes(512 * MIB)));
        assert_eq!(Bytes::parse("2GiB"), Ok(Bytes(2 * GIB)));
        assert_eq!(Bytes::parse("4096"), Ok(Bytes(4096)));
        assert!(Bytes::parse("2GB").unwrap_err().contains("unknown unit"));
        assert!(Bytes::parse("lots").is_err());
        assert_eq!(Bytes(3 * GIB).to_string(), "3GiB");
    }
}
