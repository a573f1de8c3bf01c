#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = ultra_fuzz::serve_targets::http_request(data) {
        panic!("{e}");
    }
});
