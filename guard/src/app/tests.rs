//! The lifecycle without clap: the order in which capture, listeners and
//! the gateway start and stop, with a fake capture that records its calls.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use super::*;
use crate::capture::{ClientOrigin, SocketExemption};

type Log = Arc<Mutex<Vec<String>>>;

/// Stands in for the eBPF programs: records attach and detach, and what a
/// client would see at those moments.
struct FakeCapture {
    log: Log,
    listener: SocketAddrV4,
}

impl Programs for FakeCapture {
    fn set_prefixes(&self, _: &[IpPrefix]) -> Result<(), CaptureError> {
        self.log.lock().unwrap().push("set_prefixes".into());
        Ok(())
    }
    fn set_ports(&self, _: &[u16]) -> Result<(), CaptureError> {
        self.log.lock().unwrap().push("set_ports".into());
        Ok(())
    }
    fn take_origin(&self, _: SocketAddr) -> Option<ClientOrigin> {
        None
    }
    fn exemption(&self) -> Arc<dyn SocketExemption> {
        Arc::new(NoExemption)
    }
}

impl Drop for FakeCapture {
    fn drop(&mut self) {
        // Detaching while a listener still accepts would let matched
        // connections through to nothing; it must be closed by now.
        let open = listening(self.listener);
        self.log
            .lock()
            .unwrap()
            .push(format!("detach (capture listener open: {open})"));
    }
}

/// Whether something listens on `addr`, found without connecting (a
/// connection would be accepted and hold the capture while it is looked up).
fn listening(addr: SocketAddrV4) -> bool {
    std::net::TcpListener::bind(addr).is_err()
}

fn config() -> Config {
    let mut c = crate::config::parse(
        "providers:\n  targets:\n    - id: a\n      provider: openai\n      base_url: https://127.0.0.1:9/v1\n      secret_key_ref: {env: PATH}\n",
        Path::new("t.yaml"),
    )
    .unwrap();
    c.gateway.listen = "127.0.0.1:0".parse().unwrap();
    c.gateway.capture_listen = "127.0.0.1:0".parse().unwrap();
    c.gateway.capture_listen6 = None;
    c
}

fn plan() -> CapturePlan {
    CapturePlan {
        cgroup: PathBuf::from("/nonexistent/cgroup"),
        targets: Targets {
            hosts: Vec::new(),
            static_prefixes: vec![IpPrefix {
                addr: "127.0.0.1".parse().unwrap(),
                len: 32,
            }],
            ports: vec![443],
        },
        pin_dir: None,
        keep_attached: false,
        warnings: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_attaches_before_serving_and_detaches_after_the_gateway_drained() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::build(config(), dir.path(), true).unwrap();
    let gateway = app.gateway().clone();
    let log: Log = Arc::default();

    let attach_log = log.clone();
    let attach = move |spec: &CaptureSpec| {
        // Listeners first: a redirected client finds one from the start.
        let bound = listening(spec.listen4);
        attach_log
            .lock()
            .unwrap()
            .push(format!("attach (capture listener bound: {bound})"));
        Ok(FakeCapture {
            log: attach_log.clone(),
            listener: spec.listen4,
        })
    };
    let notify_log = log.clone();
    let notify = move |n: Notice| {
        let line = match n {
            Notice::Capturing { prefixes, .. } => {
                // Everything is up: ask for shutdown, as a signal would.
                gateway.shutdown();
                format!("capturing {} prefix(es)", prefixes.len())
            }
            Notice::Drained => "drained".to_string(),
            Notice::Listening { .. } => "listening".to_string(),
        };
        notify_log.lock().unwrap().push(line);
    };
    let stopped = app
        .run_with_capture(plan(), None, attach, &notify)
        .await
        .unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        [
            "attach (capture listener bound: true)",
            "capturing 1 prefix(es)",
            "drained",
            "detach (capture listener open: false)",
        ]
    );
    assert!(stopped.detached);
    assert!(stopped.events_flushed);
}

#[tokio::test]
async fn a_failed_attach_is_an_error_naming_the_cgroup_and_nothing_serves() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::build(config(), dir.path(), true).unwrap();
    let notices: Log = Arc::default();
    let n = notices.clone();
    let err = app
        .run_with_capture(
            plan(),
            None,
            |_: &CaptureSpec| -> Result<FakeCapture, CaptureError> {
                Err(CaptureError::Spec("refused by the test".into()))
            },
            &move |notice| n.lock().unwrap().push(format!("{notice:?}")),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/cgroup"), "{err}");
    assert!(notices.lock().unwrap().is_empty(), "{notices:?}");
}

#[test]
fn a_missing_required_secret_refuses_to_build() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config();
    c.providers.targets[0].secret_key_ref =
        crate::config::SecretKeyRef::Store("KT_TEST_NOT_STORED".into());
    let err = App::build(c, dir.path(), false).unwrap_err();
    assert!(matches!(err, AppError::MissingSecrets(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("kt secrets add KT_TEST_NOT_STORED --store"),
        "{err}"
    );
}

#[test]
fn replaced_values_stay_known_as_the_previous_value_of_their_secret() {
    use std::collections::HashMap;
    let before: HashMap<String, String> = [
        ("fp:old".to_string(), "K".to_string()),
        ("fp:older".to_string(), "K (previous value)".to_string()),
        ("fp:same".to_string(), "J".to_string()),
    ]
    .into();
    let mut now: HashMap<String, String> = [
        ("fp:new".to_string(), "K".to_string()),
        ("fp:same".to_string(), "J".to_string()),
    ]
    .into();
    retain_previous(&mut now, &before);
    assert_eq!(now["fp:new"], "K");
    assert_eq!(now["fp:old"], "K (previous value)");
    assert_eq!(now["fp:older"], "K (previous value)");
    assert_eq!(now["fp:same"], "J");
    assert_eq!(now.len(), 4);
}
