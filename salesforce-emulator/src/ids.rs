//! Salesforce record ids: 15 case-sensitive characters (3-character key prefix naming the
//! object, 2 for the pod, 1 reserved, 9 for the record number in base 62), and the
//! 18-character form that appends a case-insensitive checksum of three characters.

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const SUFFIX: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345";

/// Hands out ids in sequence, like one org's record counter.
#[derive(Debug, Default)]
pub struct IdGen {
    counter: u64,
}

impl IdGen {
    /// A new 18-character id with `prefix` (e.g. `500` for a Case).
    pub fn next(&mut self, prefix: &str) -> String {
        self.counter += 1;
        let mut n = self.counter;
        let mut digits = [b'0'; 9];
        for d in digits.iter_mut().rev() {
            *d = BASE62[(n % 62) as usize];
            n /= 62;
        }
        let id15 = format!("{prefix}Ed0{}", String::from_utf8_lossy(&digits));
        to_18(&id15)
    }
}

/// Whether `id` looks like a record id (15 or 18 alphanumerics, valid checksum).
pub fn is_valid(id: &str) -> bool {
    match id.len() {
        15 => id.bytes().all(|b| b.is_ascii_alphanumeric()),
        18 => id.bytes().all(|b| b.is_ascii_alphanumeric()) && to_18(&id[..15]).eq_ignore_ascii_case(id),
        _ => false,
    }
}

/// The 18-character form of a 15- or 18-character id.
pub fn to_18(id: &str) -> String {
    if id.len() != 15 {
        return id.to_string();
    }
    let mut out = id.to_string();
    for chunk in id.as_bytes().chunks(5) {
        let mut bits = 0usize;
        for (i, b) in chunk.iter().enumerate() {
            if b.is_ascii_uppercase() {
                bits |= 1 << i;
            }
        }
        out.push(SUFFIX[bits] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_salesforce() {
        // A documented pair: 001A0000006Vm9r -> 001A0000006Vm9rIAC.
        assert_eq!(to_18("001A0000006Vm9r"), "001A0000006Vm9rIAC");
        let id = IdGen::default().next("500");
        assert!(id.starts_with("500") && id.len() == 18 && is_valid(&id), "{id}");
        assert!(!is_valid("nope"));
    }
}
