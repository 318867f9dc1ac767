//! Every byte sequence a peer can send, through every decoder it reaches. The same harness
//! runs as a property test over random bytes in CI (`protocol/tests/wire.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lbs_protocol::fuzzing::decode_untrusted(data);
});
