//! The backplane message decoder must never panic, and whatever it accepts must re-encode to the same bytes.
#![no_main]

use fusioncache::backplane::BackplaneMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = BackplaneMessage::decode(data) {
        assert_eq!(msg.encode().as_ref(), data);
    }
});
