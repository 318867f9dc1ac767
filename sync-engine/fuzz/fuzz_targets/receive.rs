//! A primary's frames, whatever they hold, reaching a pull into a receiver with files. The same harness runs as a property test over random bytes in CI
//! (`lbs_sync::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lbs_sync::fuzzing::receive(data);
});
