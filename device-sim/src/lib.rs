//! `edgecase-sim` as a library: the simulated fleet and its outputs, used by the
//! `edgecase-sim` command, by `edgecase demo` and by the end-to-end tests.
//!
//! - [`model`]: devices, sensors following patterns (constant with noise, sine, random
//!   walk, steps, drift) and defects injected at given times or with a probability
//!   (spike, stuck, dropout, out-of-range, drift); deterministic for a seed.
//! - [`inject`]: bad input on purpose: malformed JSON, wrong types, CRC errors, truncated
//!   frames, garbage bytes, duplicate and out-of-order sequence numbers.
//! - [`firmware`]: the device side of the binary serial protocol (`docs/serial-protocol.md`):
//!   waits for ACKs, retransmits, resumes sequence numbers.
//! - [`scenario`]: a TOML file describing a whole fleet with its defects and bad input.
//! - [`report`]: the run's counts, the live rate line, the summary and the manifest (what
//!   was sent: device, sequence number, value, defect markers).
//! - [`serial`] and [`mqtt`]: the outputs.

pub mod firmware;
pub mod inject;
pub mod model;
pub mod mqtt;
pub mod report;
pub mod run;
pub mod scenario;
pub mod serial;

pub use model::{DefectKind, DefectSpec, DeviceSpec, Fleet, Pattern, SensorSpec};
pub use report::{Report, Summary};
pub use run::Plan;
pub use scenario::Scenario;

/// Set to stop a running output (Ctrl-C, the demo's end).
pub type Stop = std::sync::Arc<std::sync::atomic::AtomicBool>;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// RFC 3339 UTC with milliseconds, for JSON payloads.
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_rfc3339() {
        assert_eq!(super::rfc3339_ms(1_764_000_000_123), "2025-11-24T16:00:00.123Z");
        assert_eq!(super::rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
    }
}
