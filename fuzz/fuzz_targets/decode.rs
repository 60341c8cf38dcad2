//! Arbitrary bytes into the serial protocol decoder: it must never panic, and whatever it
//! accepts must encode back to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgecase_protocol::fuzz::check(data);
});
