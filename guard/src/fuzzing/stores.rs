//! The on-disk stores: the event store (SQLite) and the secret store file.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::events::{Cursor, Decision, Event, EventStore, Filter};
use crate::secrets::{FileStore, SecretStore, SecretValue, validate_name, validate_value};

/// A private directory of this process for one harness (created once).
pub(super) fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kt-fuzz-{}-{name}", std::process::id()));
    crate::datadir::create_private_dir(&dir).expect("create the scratch dir");
    dir
}

/// Replaces `path` by a private (0600) file holding `bytes`.
fn write_private(path: &Path, bytes: &[u8]) {
    let _ = std::fs::remove_file(path);
    let mut f = crate::datadir::create_private_file(path).expect("create a scratch file");
    std::io::Write::write_all(&mut f, bytes).expect("write a scratch file");
}

/// Any bytes as `events.db`: reading (`kt events`) and opening for writing
/// (`kt run`) give errors, never a panic, and stop.
pub fn event_store(data: &[u8]) {
    let dir = scratch_dir("events");
    let db = crate::datadir::events_db(&dir);
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = db.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    write_private(&db, data);

    if let Ok(Some(store)) = EventStore::open_read_only(&dir) {
        let all = store.query(&Filter::default());
        let _ = store.count();
        let _ = store.max_id();
        let _ = store.cursor();
        let filtered = Filter {
            since: Some(std::time::Duration::from_secs(3600)),
            decision: Some(Decision::Block),
            target: Some("t1".into()),
            provider: Some("openai".into()),
            limit: Some(3),
            after_id: Some(1),
            stream_cut: true,
        };
        let _ = store.query(&filtered);
        let _ = store.changes_since(&Filter::default(), Cursor::default());
        if let Ok(all) = all {
            for e in &all {
                // What is read back renders (kt events --json).
                let _ = serde_json::to_string(e).expect("an event serializes");
            }
        }
    }
    if let Ok(mut store) = EventStore::open(&dir, 4) {
        let mut batch = [Event::new("fuzz-req", Decision::Allow)];
        if store.insert(&mut batch).is_ok() {
            let _ = store.query(&Filter::default());
        }
    }
}

/// The made-up key of the secret store fixture.
const KEY: [u8; 32] = [7; 32];

struct SecretFixture {
    dir: PathBuf,
    store: FileStore,
    /// A store file sealed by kt itself, holding two entries.
    sealed: Vec<u8>,
}

fn secret_fixture() -> &'static SecretFixture {
    static F: OnceLock<SecretFixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = scratch_dir("secrets");
        let store = FileStore::new(&dir);
        crate::datadir::create_private_dir(store.dir()).expect("secrets dir");
        let _ = std::fs::remove_file(store.store_path());
        write_private(&store.key_path(), &KEY);
        for (name, value) in [
            ("OPENAI_KEY", "sk-made-up-1"),
            ("ANTHROPIC_KEY", "made-up-2"),
        ] {
            store
                .put(name, &SecretValue::new(value))
                .expect("seal the fixture");
        }
        let sealed = std::fs::read(store.store_path()).expect("read the fixture");
        SecretFixture { dir, store, sealed }
    })
}

/// Seals `plain` as kt does (the format in `secrets::file`), so the
/// harness can reach the parsing behind the authentication.
fn seal(plain: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&KEY).expect("any key length");
    mac.update(b"kt secret store key id v1");
    let mut out = b"KTSTORE1".to_vec();
    out.extend_from_slice(&mac.finalize().into_bytes()[..8]);
    let nonce = XNonce::from([9u8; 24]);
    let sealed = XChaCha20Poly1305::new(&KEY.into())
        .encrypt(
            &nonce,
            Payload {
                msg: plain,
                aad: &out,
            },
        )
        .expect("seal in memory");
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// The secret store file, tampered with or replaced: first byte picks the
/// mode. 0: the rest are edits `(offset u16, xor)` to a store kt sealed
/// (an offset past the end appends): any change is refused, no change
/// reads back the two entries. 1: the rest is the whole file. 2: the rest
/// is the store's decrypted contents, sealed with the right key: whatever
/// is read back is a valid name with a servable (non-empty) value.
pub fn secret_store(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = secret_fixture();
    let file = match mode % 3 {
        0 => {
            let mut file = f.sealed.clone();
            for edit in rest.chunks_exact(3) {
                let at = usize::from(u16::from_be_bytes([edit[0], edit[1]]));
                match file.get_mut(at) {
                    Some(b) => *b ^= edit[2],
                    None => file.push(edit[2]),
                }
            }
            file
        }
        1 => rest.to_vec(),
        _ => seal(rest),
    };
    write_private(&f.store.store_path(), &file);
    let _ = &f.dir;

    let list = f.store.list();
    let entries = f.store.entries();
    let one = f.store.get("OPENAI_KEY");
    if mode % 3 != 2 {
        if file == f.sealed {
            assert_eq!(list.expect("the store as sealed reads").len(), 2);
            assert_eq!(
                one.expect("reads").expect("present").expose(),
                "sk-made-up-1"
            );
        } else {
            assert!(list.is_err(), "a changed store file was accepted");
            assert!(entries.is_err(), "a changed store file was accepted");
            assert!(one.is_err(), "a changed store file was accepted");
        }
        return;
    }
    if let Ok(list) = &list {
        for meta in list {
            assert!(validate_name(&meta.name).is_ok(), "invalid name served");
        }
    }
    if let Ok(entries) = entries {
        for (meta, value) in entries {
            assert!(validate_name(&meta.name).is_ok(), "invalid name served");
            if let Some(v) = value {
                assert!(validate_value(&v).is_ok(), "unservable value served");
            }
        }
    }
    if let Ok(Some(v)) = one {
        assert!(validate_value(&v).is_ok(), "unservable value served");
    }
}
