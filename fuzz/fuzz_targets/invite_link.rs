//! `miyu_proto::InviteLink` parsing: links are pasted by users and arrive from strangers. A
//! link that parses must print as a link that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miyu_proto::InviteLink;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(link) = text.parse::<InviteLink>() else {
        return;
    };
    let printed = link.to_string();
    let again = printed
        .parse::<InviteLink>()
        .expect("a printed invite link parses");
    assert!(again == link, "round trip changed the link: {printed}");
});
