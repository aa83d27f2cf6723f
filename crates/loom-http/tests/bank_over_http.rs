//! The bank example with `--listen`, run as a user runs it: once it has verified its own
//! transfers it serves its actors over HTTP, and a client opens accounts and moves money with
//! plain HTTP requests, a retried one applied once.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Kills the bank if the test fails before it stops it.
struct Bank(Child);

impl Drop for Bank {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            // Not panicking in a drop that may run while the test panics.
            if let Err(e) = self.0.kill().and_then(|()| self.0.wait().map(drop)) {
                eprintln!("could not stop the bank: {e}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moves_money_over_http_once_per_key() {
    let bank = loom_testkit::examples::example("bank");
    let data = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(&bank)
        .args([
            "--accounts",
            "4",
            "--transfers",
            "20",
            "--listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(data.path().join("bank"))
        .env("LOOM_TOKEN", "t0ken")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the bank");
    let stdout = child.stdout.take().expect("stdout");
    let mut bank = Bank(child);
    // Its lines up to "serving": where it listens, and its own check passed.
    let lines = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("read stdout");
            let done = line == "serving until Ctrl-C";
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    });
    let lines = tokio::time::timeout(Duration::from_secs(120), lines)
        .await
        .expect("the bank did not start serving within 120 s")
        .expect("join");
    assert!(
        lines.iter().any(|l| l.starts_with("verified:")),
        "{lines:?}"
    );
    let base = lines
        .iter()
        .find_map(|l| l.strip_prefix("listening on "))
        .unwrap_or_else(|| panic!("no address in {lines:?}"))
        .to_owned();

    let http = reqwest::Client::new();
    let ask = |path: &str, body: Value, key: Option<&str>| {
        let mut r = http
            .post(format!("{base}/actors/{path}/ask"))
            .bearer_auth("t0ken")
            .json(&body);
        if let Some(k) = key {
            r = r.header("Idempotency-Key", k);
        }
        async move {
            let resp = r.send().await.expect("request");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("a JSON body"))
        }
    };
    assert_eq!(
        ask("account/alice", json!({"Open": 100}), None).await.0,
        200
    );
    assert_eq!(ask("account/bob", json!({"Open": 0}), None).await.0, 200);
    let start = json!({"Start": {"from": "alice", "to": "bob", "amount": 30}});
    for _ in 0..2 {
        let (s, b) = ask("transfer/web-1", start.clone(), Some("web-1")).await;
        assert_eq!(
            (s, b),
            (200, json!("Debiting")),
            "the retried start got another answer"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, b) = ask("transfer/web-1", json!("Status"), None).await;
        assert_eq!(s, 200, "{b}");
        if b == json!("Done") {
            break;
        }
        assert!(Instant::now() < deadline, "the transfer is still {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, alice) = ask("account/alice", json!("Balance"), None).await;
    let (_, bob) = ask("account/bob", json!("Balance"), None).await;
    assert_eq!(alice["balance"], 70, "{alice}");
    assert_eq!(
        (bob["balance"].clone(), bob["credits"].clone()),
        (json!(30), json!(1)),
        "{bob}"
    );

    // Typed errors over the wire, and the token is required.
    let (s, b) = ask("vault/main", json!("Balance"), None).await;
    assert_eq!((s, &b["error"]), (404, &json!("unknown_kind")), "{b}");
    let resp = http
        .post(format!("{base}/actors/account/bob/ask"))
        .json(&json!("Balance"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 401);

    // The run's turns are in the Prometheus scrape, per kind; the store is healthy.
    let scrape = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    let count = |series: &str| -> f64 {
        loom_testkit::scrape::value(&scrape, series)
            .unwrap_or_else(|| panic!("no {series} in the scrape:\n{scrape}"))
    };
    assert!(
        count(r#"loom_turn_seconds_count{kind="transfer"}"#) >= 20.0,
        "{scrape}"
    );
    assert!(
        count(r#"loom_store_commit_seconds_count{kind="account"}"#) > 0.0,
        "{scrape}"
    );
    assert!(
        count(r#"loom_invocations_total{kind="transfer"}"#) >= 20.0,
        "{scrape}"
    );
    assert!(
        count(r#"loom_activation_seconds_count{kind="account"}"#) > 0.0,
        "{scrape}"
    );
    assert!(count("loom_active_actors") >= 0.0, "{scrape}");
    // The mailboxes, read from the store at the scrape: each settled transfer waits for its
    // retirement (a delayed message), nothing is ready and left waiting.
    assert!(
        count(r#"loom_mailboxes_waiting{kind="transfer"}"#) >= 20.0,
        "{scrape}"
    );
    assert_eq!(
        count(r#"loom_mailboxes_ready{kind="account"}"#),
        0.0,
        "{scrape}"
    );
    assert_eq!(
        count(r#"loom_mailbox_wait_seconds{kind="transfer"}"#),
        0.0,
        "{scrape}"
    );
    assert_eq!(count("loom_store_healthy"), 1.0, "{scrape}");
    let health = http
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(
        health.json::<Value>().await.expect("json")["store"]["state"],
        "healthy"
    );

    // Ctrl-C: it stops serving and exits cleanly.
    let pid = bank.0.id().to_string();
    let killed = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill -INT");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = bank.0.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "the bank did not stop on SIGINT");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
}

/// The bank reads its settings from `--config` and `LOOM_*`: a typo in the file or a bad value
/// in the environment stops it at once with a sentence that names the setting.
#[test]
fn the_bank_refuses_a_bad_setting_by_name() {
    let bank = loom_testkit::examples::example("bank");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("loom.toml");
    let run = |config: &str, env: Option<(&str, &str)>| {
        std::fs::write(&file, config).expect("write the file");
        let mut cmd = Command::new(&bank);
        cmd.args(["--accounts", "2", "--transfers", "1", "--config"])
            .arg(&file)
            .arg("--data")
            .arg(dir.path().join("bank"));
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run the bank");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run("lease_tll = \"15s\"\n", None);
    assert!(
        !ok && err.contains("unknown setting \"lease_tll\""),
        "{err}"
    );
    let (ok, err) = run(
        "[retry]\nmax_attempts = 3\n",
        Some(("LOOM_LEASE_TTL", "ten")),
    );
    assert!(!ok && err.contains("environment: LOOM_LEASE_TTL"), "{err}");
    let (ok, err) = run("ask_timeout = \"60s\"\n[retry]\nmax_attempts = 3\n", None);
    assert!(ok, "good settings refused: {err}");
}
