//! A control-socket line of arbitrary bytes, parsed as a request and as a reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapblk::ctl::protocol::{parse_reply, Request};

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(req) = Request::parse(line) {
        // What parsed encodes to a line that parses to the same request.
        let again = Request::parse(&req.encode()).expect("an encoded request parses");
        assert_eq!(again.command, req.command);
    }
    let _ = parse_reply(line);
});
