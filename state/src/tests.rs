use super::*;

const KEEP: WriteOptions = WriteOptions {
    ttl_ms: None,
    when_full: WhenFull::Refuse,
};

#[test]
fn compare_and_set_and_caps() {
    let s = Scope::default();
    assert_eq!(s.set("k", b"a", Some(0), KEEP, 0).unwrap().value, 1);
    assert_eq!(
        s.set("k", b"b", Some(0), KEEP, 0),
        Err(StateError::Conflict(1))
    );
    assert_eq!(s.set("k", b"b", Some(1), KEEP, 0).unwrap().value, 2);
    assert_eq!(s.get("k", 0).unwrap().1, 2);
    assert_eq!(
        s.set("big", &vec![0; VALUE_CAP + 1], None, KEEP, 0),
        Err(StateError::TooLarge)
    );
    assert_eq!(s.set("", b"", None, KEEP, 0), Err(StateError::BadKey));
    assert_eq!(s.counter_add("c", 2, KEEP, 0).unwrap().value, 2);
    assert_eq!(s.counter_add("c", -3, KEEP, 0).unwrap().value, -1);
    assert_eq!(s.counter_get("c", 0), -1);
    assert!(s.delete("k", 0));
    assert!(!s.delete("k", 0));
}

#[test]
fn a_version_from_before_a_delete_never_matches_again() {
    // set → 1; delete; set → 1; compare_and_set(stale 1) used to succeed.
    let s = Scope::default();
    let stale = s.set("k", b"old", None, KEEP, 0).unwrap().value;
    assert!(s.delete("k", 0));
    let fresh = s.set("k", b"new", None, KEEP, 0).unwrap().value;
    assert_ne!(fresh, stale);
    assert_eq!(
        s.set("k", b"lost", Some(stale), KEEP, 0),
        Err(StateError::Conflict(fresh))
    );
    assert_eq!(&*s.get("k", 0).unwrap().0, b"new");
    // The same across an expiry.
    let v = s
        .set("t", b"x", None, WriteOptions::ttl(10, false), 0)
        .unwrap();
    assert_eq!(s.get("t", 10), None);
    let again = s.set("t", b"y", Some(0), KEEP, 10).unwrap().value;
    assert!(again > v.value);
    assert_eq!(
        s.set("t", b"z", Some(v.value), KEEP, 10),
        Err(StateError::Conflict(again))
    );
}

#[test]
fn delete_if_version_removes_only_the_version_read() {
    let s = Scope::default();
    let v = s.set("k", b"a", None, KEEP, 0).unwrap().value;
    let newer = s.set("k", b"b", None, KEEP, 0).unwrap().value;
    assert_eq!(s.delete_if("k", v, 0), Err(StateError::Conflict(newer)));
    assert_eq!(s.delete_if("k", newer, 0), Ok(()));
    assert_eq!(s.delete_if("k", newer, 0), Err(StateError::Conflict(0)));
    assert!(s.is_empty(0));
}

#[test]
fn expired_keys_are_gone_and_free_their_slots() {
    let s = Scope::default();
    let ttl = WriteOptions::ttl(100, false);
    s.set("e", b"v", None, ttl, 0).unwrap();
    s.counter_add("c", 5, ttl, 0).unwrap();
    assert_eq!(s.get("e", 99).map(|e| e.1), Some(1));
    assert_eq!(s.counter_get("c", 99), 5);
    // A write with a time to live sets it again; one without keeps it.
    s.counter_add("c", 1, ttl, 50).unwrap();
    s.counter_add("c", 1, KEEP, 120).unwrap();
    assert_eq!(s.get("e", 100), None, "expired at 0 + 100");
    assert_eq!(s.counter_get("c", 149), 7);
    assert_eq!(s.counter_get("c", 150), 0, "expired at 50 + 100");
    assert_eq!(s.len(150), 0);
    // Never expiring, explicitly.
    s.counter_add("p", 1, ttl, 0).unwrap();
    let forever = WriteOptions {
        ttl_ms: Some(None),
        when_full: WhenFull::Refuse,
    };
    s.counter_add("p", 1, forever, 0).unwrap();
    assert_eq!(s.counter_get("p", 1_000_000), 2);
}

#[test]
fn at_the_cap_a_write_is_refused_or_evicts_the_least_recently_used() {
    let s = Scope::default();
    for i in 0..KEY_CAP {
        s.counter_add(&format!("k{i}"), 1, KEEP, 0).unwrap();
    }
    assert_eq!(
        s.counter_add("one-more", 1, KEEP, 0),
        Err(StateError::TooManyKeys)
    );
    assert_eq!(
        s.set("one-more", b"", None, KEEP, 0),
        Err(StateError::TooManyKeys)
    );
    // k0 was written first, but read since: k1 is the least recently used.
    assert_eq!(s.counter_get("k0", 0), 1);
    let evict = WriteOptions {
        ttl_ms: None,
        when_full: WhenFull::EvictLeastRecentlyUsed,
    };
    let w = s.counter_add("one-more", 1, evict, 0).unwrap();
    assert!(w.evicted);
    assert_eq!(s.counter_get("k1", 0), 0);
    assert_eq!(s.counter_get("k0", 0), 1);
    assert_eq!(s.len(0), KEY_CAP);
    // An existing key is written without evicting anything.
    assert!(!s.counter_add("k2", 1, evict, 0).unwrap().evicted);
}

#[test]
fn twenty_thousand_short_lived_keys_never_fill_the_scope() {
    let s = Scope::default();
    for i in 0..20_000u64 {
        // One new client every ms, each bucket living 2 s.
        let w = s
            .set(
                &format!("client-{i}"),
                b"bucket",
                None,
                WriteOptions::ttl(2_000, false),
                i,
            )
            .unwrap();
        assert!(!w.evicted);
    }
    assert_eq!(s.len(20_000), 2_000 - 1);
}

#[test]
fn a_release_does_not_bring_back_an_expired_counter() {
    let s = Scope::default();
    s.counter_add("held", 1, WriteOptions::ttl(10, false), 0)
        .unwrap();
    s.counter_release("held", 1, 20);
    assert!(s.is_empty(20));
    s.counter_add("held", 2, KEEP, 20).unwrap();
    s.counter_release("held", 1, 20);
    assert_eq!(s.counter_get("held", 20), 1);
}

#[test]
fn a_counter_within_its_limit_is_added_past_it_not() {
    let s = Scope::default();
    assert_eq!(s.counter_add_within("r", 1, 2, 0), Ok(Some(1)));
    assert_eq!(s.counter_add_within("r", 1, 2, 0), Ok(Some(2)));
    assert_eq!(s.counter_add_within("r", 1, 2, 0), Ok(None));
    assert_eq!(s.counter_get("r", 0), 2);
    assert_eq!(s.counter_add_within("", 1, 2, 0), Err(StateError::BadKey));
}
