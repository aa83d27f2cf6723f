//! The outbox relay of a partitioned Redis store (`relay.rs`): relays of several processes
//! moving the same outboxes deliver each message once, and a store's partition count is fixed
//! when it is created.

use std::time::Duration;

use loom_core::partition::partition_of;
use loom_core::store::backend::{Outgoing, check_outboxes};
use loom_core::{ActorId, Envelope, JournalStore, Mailbox, Store, StoreError};
use loom_redis::{RedisOptions, RedisStore};
use loom_testkit::conformance::partitions::{
    arrived, drained_payloads, rounds_by_sender, send_turn, spread_in,
};
use loom_testkit::servers::RedisServer;
use serde_json::json;

async fn connect(
    url: &str,
    prefix: &str,
    partitions: Option<u32>,
) -> Result<RedisStore, StoreError> {
    RedisStore::connect_with(
        url,
        RedisOptions {
            prefix: prefix.to_owned(),
            partitions,
            ..RedisOptions::default()
        },
    )
    .await
}

fn id(kind: &str, key: &str) -> ActorId {
    ActorId::new(kind, key).expect("valid id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_of_several_processes_move_each_message_once() {
    let server = RedisServer::start();
    let url = server.url();
    let n = 4;
    // Four connections of one store: four relays, each looking at every outbox every sweep,
    // while the turns' own store moves what they wrote at once.
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(connect(&url, "race", Some(n)).await.expect("connect"));
    }
    let senders = spread_in(n, "s", 4);
    let receivers = spread_in(n, "r", 2);
    let rounds = 40u64;
    let mut tasks = Vec::new();
    for (i, s) in senders.iter().enumerate() {
        let store = stores[i % stores.len()].clone();
        let (s, receivers) = (s.clone(), receivers.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..rounds {
                let send: Vec<Outgoing> = receivers
                    .iter()
                    .map(|r| Outgoing {
                        envelope: Envelope::new(
                            r.clone(),
                            json!({ "from": s.as_str(), "round": round }),
                        ),
                        deliver_at: None,
                    })
                    .collect();
                send_turn(&store, &s, round + 1, &send).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
    let store = &stores[0];
    let expected = senders.len() as u64 * rounds;
    for r in &receivers {
        arrived(store, r, expected).await;
    }
    // Every relay's sweep has looked again since: anything moved twice is there now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for r in &receivers {
        let by_sender = rounds_by_sender(store, r).await;
        assert_eq!(by_sender.len(), senders.len(), "{r}");
        for (s, seen) in by_sender {
            assert_eq!(
                seen,
                (0..rounds).collect::<Vec<_>>(),
                "{s} → {r}: each once, in the order sent"
            );
        }
    }
    let states = store.outbox_states().await.expect("outbox states");
    assert_eq!(states.len(), n as usize);
    assert!(
        check_outboxes(&states).is_empty(),
        "{:?}",
        check_outboxes(&states)
    );
    assert!(states.iter().all(|s| s.pending == 0), "{states:?}");
    assert!(
        store
            .relay_backlog()
            .await
            .unwrap()
            .iter()
            .all(|b| b.waiting == 0),
        "the backlog reads empty"
    );
    for s in stores {
        s.destroy().await.expect("destroy");
    }
}

/// The state a crash leaves between a move and its trim: the outbox still holds a message its
/// target already took. The next move must skip it by the mark, and trim it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_repeated_after_a_crash_before_the_trim_enqueues_nothing_twice() {
    let server = RedisServer::start();
    let url = server.url();
    let store = connect(&url, "again", Some(3)).await.expect("connect");
    let a = id("relay", "a");
    let pa = partition_of(&a, 3);
    let b = (0..)
        .map(|i| id("relay", &format!("b{i}")))
        .find(|b| partition_of(b, 3) != pa)
        .unwrap();
    let msg = Envelope::new(b.clone(), json!("once"));
    let send = [Outgoing {
        envelope: msg.clone(),
        deliver_at: None,
    }];
    send_turn(&store, &a, 1, &send).await;
    arrived(&store, &b, 1).await;
    // Put the moved message back in the outbox, as it was before the trim.
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ob = format!("again:{{_p.{pa}}}:ob");
    let _: () = redis::pipe()
        .cmd("DEL")
        .arg(&ob)
        .cmd("XADD")
        .arg(&ob)
        .arg("1-0")
        .arg("to")
        .arg(b.as_str())
        .arg("id")
        .arg(msg.id.to_string())
        .arg("due")
        .arg("0")
        .arg("m")
        .arg(loom_core::store::backend::prepare_message(&msg).unwrap())
        .query_async(&mut conn)
        .await
        .unwrap();
    // A later message from a, behind it in the same outbox.
    let later = [Outgoing {
        envelope: Envelope::new(b.clone(), json!("later")),
        deliver_at: None,
    }];
    send_turn(&store, &a, 2, &later).await;
    arrived(&store, &b, 2).await;
    // Every relay has looked again since.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let got = drained_payloads(&store, &b).await;
    assert_eq!(got, [json!("once"), json!("later")], "each once, in order");
    let states = store.outbox_states().await.expect("states");
    assert!(
        check_outboxes(&states).is_empty(),
        "{:?}",
        check_outboxes(&states)
    );
    assert_eq!(states[pa as usize].pending, 0, "the outbox is trimmed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stores_partition_count_is_fixed_when_it_is_created() {
    let server = RedisServer::start();
    let url = server.url();
    let a = id("relay", "a");

    let three = connect(&url, "three", Some(3)).await.expect("connect");
    assert_eq!(three.partitions(), 3);
    send_turn(&three, &a, 1, &[]).await;
    // Later connects read the count the store was made with.
    assert_eq!(connect(&url, "three", None).await.unwrap().partitions(), 3);
    assert_eq!(
        connect(&url, "three", Some(3)).await.unwrap().partitions(),
        3
    );
    let err = connect(&url, "three", Some(4))
        .await
        .expect_err("another count");
    assert!(
        matches!(&err, StoreError::InvalidRequest(m) if m.contains("3 partition")),
        "{err}"
    );

    // A store of one partition with data cannot be taken for a partitioned one.
    let one = connect(&url, "one", None).await.expect("connect");
    assert_eq!(one.partitions(), 1);
    send_turn(&one, &a, 1, &[]).await;
    let err = connect(&url, "one", Some(3))
        .await
        .expect_err("recorded as one");
    assert!(
        matches!(&err, StoreError::InvalidRequest(m) if m.contains("has 1 partition(s), not 3")),
        "{err}"
    );
    // A store of a build before counts were recorded: its data says it has one.
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg("one:partitions")
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = connect(&url, "one", Some(3))
        .await
        .expect_err("data of one partition");
    assert!(
        matches!(&err, StoreError::InvalidRequest(m) if m.contains("already holds data of one partition")),
        "{err}"
    );
    assert_eq!(connect(&url, "one", None).await.unwrap().partitions(), 1);
    assert_eq!(one.highest_seq(&a).await.unwrap(), 1, "nothing was touched");

    let err = connect(&url, "zero", Some(0))
        .await
        .expect_err("0 partitions");
    assert!(matches!(err, StoreError::InvalidRequest(_)), "{err}");
}

/// Rule D16 for the relay (`loom_testkit::conformance::partitions`): an entry of a partition's
/// outbox that is not an outbox message (damage) stops that outbox's moves; the health names
/// the partition until the entry is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cannot_move_shows_in_the_runtimes_health() {
    let server = RedisServer::start();
    let url = server.url();
    let store = connect(&url, "sick", Some(3)).await.expect("connect");
    let conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let damaged = std::sync::Arc::new(std::sync::Mutex::new(None::<u32>));
    let (c1, c2, d1, d2) = (conn.clone(), conn, damaged.clone(), damaged);
    loom_testkit::conformance::partitions::a_relay_that_cannot_move_shows_in_the_runtimes_health(
        std::sync::Arc::new(store),
        |p| async move {
            let mut conn = c1;
            *d1.lock().unwrap() = Some(p);
            // Seq 1 of the outbox, without an outbox message's fields; the turns of p number
            // theirs from 2 on.
            let _: () = redis::pipe()
                .cmd("XADD")
                .arg(format!("sick:{{_p.{p}}}:ob"))
                .arg("1-0")
                .arg("what")
                .arg("damage")
                .ignore()
                .cmd("HSET")
                .arg(format!("sick:{{_p.{p}}}:obm"))
                .arg("s")
                .arg(1)
                .ignore()
                .query_async(&mut conn)
                .await
                .expect("damage the outbox");
        },
        || async move {
            let mut conn = c2;
            let p = d2.lock().unwrap().expect("damaged");
            let removed: u64 = redis::cmd("XDEL")
                .arg(format!("sick:{{_p.{p}}}:ob"))
                .arg("1-0")
                .query_async(&mut conn)
                .await
                .expect("remove the damage");
            assert_eq!(removed, 1);
        },
    )
    .await;
}

/// A sweep moves what a process left in an outbox (it crashed before its relay moved it) even
/// while another partition's outbox cannot be read (here its key damaged, as its primary down
/// on a cluster fails the read): each outbox's length is read on its own. Before, the one
/// failing read failed the whole look at every sweep, and the message never moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_that_cannot_be_read_holds_up_no_other_sweep() {
    let server = RedisServer::start();
    let url = server.url();
    let first = connect(&url, "sweep", Some(3)).await.expect("connect");
    let in_partition = |p: u32| {
        (0..)
            .map(|i| id("relay", &format!("t{i}")))
            .find(|t| partition_of(t, 3) == p)
            .unwrap()
    };
    let (a, b) = (in_partition(0), in_partition(1));
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // The first process cannot move to b (b's high-water key damaged), and stops.
    let hw = "sweep:{_p.1}:hw";
    let () = redis::cmd("SET")
        .arg(hw)
        .arg("damaged")
        .query_async(&mut conn)
        .await
        .unwrap();
    send_turn(
        &first,
        &a,
        1,
        &[Outgoing {
            envelope: Envelope::new(b.clone(), json!("left behind")),
            deliver_at: None,
        }],
    )
    .await;
    drop(first);
    let () = redis::cmd("SET")
        .arg("sweep:{_p.2}:ob")
        .arg("not an outbox")
        .query_async(&mut conn)
        .await
        .unwrap();
    let () = redis::cmd("DEL")
        .arg(hw)
        .query_async(&mut conn)
        .await
        .unwrap();
    // Only the second process's sweep can find the message: nothing pushed to its relay.
    let second = connect(&url, "sweep", Some(3)).await.expect("connect");
    arrived(&second, &b, 1).await;
    assert_eq!(drained_payloads(&second, &b).await, [json!("left behind")]);
    let failing = second
        .relay_failure()
        .expect("the unreadable outbox is reported");
    assert!(failing.latest.contains("WRONGTYPE"), "{failing:?}");
}

/// A target whose moves fail (here its high-water key damaged, as a primary that is down
/// fails them) holds up only its own messages: a later message of the same outbox to another
/// target still arrives, and once the target mends, its message arrives once. Before, the pass
/// stopped at the first failing target and nothing behind it moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_target_holds_up_only_its_own_messages() {
    let server = RedisServer::start();
    let url = server.url();
    let store = connect(&url, "stall", Some(3)).await.expect("connect");
    let a = id("relay", "a");
    let pa = partition_of(&a, 3);
    let other = |not: &[u32]| {
        (0..)
            .map(|i| id("relay", &format!("t{i}")))
            .find(|t| !not.contains(&partition_of(t, 3)))
            .unwrap()
    };
    let b = other(&[pa]);
    let pb = partition_of(&b, 3);
    let c = other(&[pa, pb]);
    // Partition order decides which target a pass tries first: the failing one goes first.
    let (b, c) = if pb < partition_of(&c, 3) {
        (b, c)
    } else {
        (c, b)
    };
    let pb = partition_of(&b, 3);
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let hw = format!("stall:{{_p.{pb}}}:hw");
    let () = redis::cmd("SET")
        .arg(&hw)
        .arg("damaged")
        .query_async(&mut conn)
        .await
        .unwrap();
    let to = |who: &ActorId, what: &str| {
        [Outgoing {
            envelope: Envelope::new(who.clone(), json!(what)),
            deliver_at: None,
        }]
    };
    send_turn(&store, &a, 1, &to(&c, "c1")).await;
    send_turn(&store, &a, 2, &to(&b, "to b")).await;
    send_turn(&store, &a, 3, &to(&c, "c2")).await;
    arrived(&store, &c, 2).await;
    assert_eq!(store.pending(&b).await.unwrap(), 0);
    // Trimmed up to the message the failing target has not taken, and no further.
    // (The trim follows the moves: looked at until it came.)
    let mut waiting = u64::MAX;
    for _ in 0..500 {
        waiting = redis::cmd("XLEN")
            .arg(format!("stall:{{_p.{pa}}}:ob"))
            .query_async(&mut conn)
            .await
            .unwrap();
        if waiting <= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(waiting, 2);
    let () = redis::cmd("DEL")
        .arg(&hw)
        .query_async(&mut conn)
        .await
        .unwrap();
    arrived(&store, &b, 1).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(drained_payloads(&store, &b).await, [json!("to b")]);
    assert_eq!(
        drained_payloads(&store, &c).await,
        [json!("c1"), json!("c2")]
    );
    let states = store.outbox_states().await.expect("states");
    assert_eq!(states[pa as usize].pending, 0, "the outbox is trimmed");
}

/// A target that stays down does not make every pass read its backlog again: the passes after
/// the one that met the failure read on from where it stopped (so messages to healthy targets
/// sent meanwhile still go), and try the failed target with one page of its own messages.
/// Once it takes them, its whole backlog follows, in order, once. Outbox reads are counted by
/// the server's `INFO commandstats` (before: every pass read all 24 pages of the backlog
/// again, about 100 reads over the two seconds counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_behind_a_failing_target_is_not_read_again_at_every_pass() {
    let server = RedisServer::start();
    let url = server.url();
    let store = connect(&url, "backlog", Some(3)).await.expect("connect");
    let a = id("relay", "a");
    let pa = partition_of(&a, 3);
    let other = |not: &[u32]| {
        (0..)
            .map(|i| id("relay", &format!("t{i}")))
            .find(|t| !not.contains(&partition_of(t, 3)))
            .unwrap()
    };
    let b = other(&[pa]);
    let pb = partition_of(&b, 3);
    let c = other(&[pa, pb]);
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // `b`'s partition fails every move: its high-water marks are not a hash.
    let hw = format!("backlog:{{_p.{pb}}}:hw");
    let () = redis::cmd("SET")
        .arg(&hw)
        .arg("damaged")
        .query_async(&mut conn)
        .await
        .unwrap();
    // 12 000 messages to `b`: 24 pages of the outbox.
    let (turns, per_turn) = (12u64, 1000u64);
    for t in 0..turns {
        let send: Vec<Outgoing> = (0..per_turn)
            .map(|i| Outgoing {
                envelope: Envelope::new(b.clone(), json!(t * per_turn + i)),
                deliver_at: None,
            })
            .collect();
        send_turn(&store, &a, t + 1, &send).await;
    }
    let to_c = |what: &str| {
        [Outgoing {
            envelope: Envelope::new(c.clone(), json!(what)),
            deliver_at: None,
        }]
    };
    send_turn(&store, &a, turns + 1, &to_c("c1")).await;
    arrived(&store, &c, 1).await;
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let reads: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_xrange:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    eprintln!("{reads} outbox reads over 2 s of passes");
    assert!(
        reads < 24,
        "{reads} outbox reads in 2 s: the backlog was read again"
    );
    // A healthy target still gets what is sent to it after the backlog.
    send_turn(&store, &a, turns + 2, &to_c("c2")).await;
    arrived(&store, &c, 2).await;
    assert_eq!(store.pending(&b).await.unwrap(), 0);
    // Repaired: the whole backlog follows, once and in order.
    let () = redis::cmd("DEL")
        .arg(&hw)
        .query_async(&mut conn)
        .await
        .unwrap();
    arrived(&store, &b, turns * per_turn).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let got = drained_payloads(&store, &b).await;
    let expected: Vec<serde_json::Value> = (0..turns * per_turn).map(|n| json!(n)).collect();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "the backlog arrived out of order or twice");
    assert_eq!(
        drained_payloads(&store, &c).await,
        [json!("c1"), json!("c2")]
    );
    let states = store.outbox_states().await.expect("states");
    assert_eq!(states[pa as usize].pending, 0, "the outbox is trimmed");
}
