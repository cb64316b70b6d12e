//! `config-agent`: shared state through Redis, with the agent process doing the singleton work.
//!
//! The **agent** alone subscribes to the Redis pub/sub channel `cluster:config` and sends each
//! payload to every worker; it keeps the last one (also in Redis, under `cluster:config:last`,
//! so a restarted agent still knows it) and answers workers that ask for it when they start.
//! It reconnects with backoff whenever Redis goes away.
//!
//! The **workers** serve HTTP: `GET /config` answers the last payload published on
//! `cluster:config`, byte for byte (404 before the first one); it keeps working from memory
//! while Redis is down. `GET /hits` counts itself in Redis (`INCR cluster:hits`) and returns
//! the count, shared by every worker (503 while Redis is down).
//!
//! Env: `REDIS_URL` (default `redis://127.0.0.1:6379`), plus `HOST`, `PORT` and
//! `CLUSTER_WORKERS` as for `hello`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use bytes::Bytes;
use cluster::Peer;
use futures::StreamExt;

const CHANNEL: &str = "cluster:config";
const LAST_KEY: &str = "cluster:config:last";
const HITS_KEY: &str = "cluster:hits";
/// Asked by a starting worker; answered with [`encode_config`].
const ASK_CONFIG: &[u8] = b"config?";

#[cluster::main(agent = agent)]
async fn main() -> std::io::Result<()> {
    let redis = redis_client();
    let config = Arc::new(Mutex::new(None::<Bytes>));
    tokio::spawn(follow_config(config.clone()));
    let state = AppState { config, hits: Arc::new(Hits { client: redis, conn: Default::default() }) };
    let app = Router::new().route("/config", get(get_config)).route("/hits", get(get_hits)).with_state(state);
    // Stops and reloads fail no request: see `axum-hello`.
    let app = app.layer(cluster::http::CloseOnShutdown);
    let listener = cluster::net::TcpListener::bind(examples::listen_addr()).await?;
    let id = cluster::worker::id().unwrap_or(0);
    println!("worker {id} (pid {}) listening on http://{}", std::process::id(), listener.local_addr()?);
    axum::serve(listener, app).with_graceful_shutdown(cluster::http::shutdown()).await
}

fn redis_client() -> redis::Client {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    redis::Client::open(url.as_str()).unwrap_or_else(|e| {
        eprintln!("config-agent: REDIS_URL={url:?} is not a Redis URL: {e}");
        std::process::exit(2);
    })
}

// ----- the workers -----

#[derive(Clone)]
struct AppState {
    config: Arc<Mutex<Option<Bytes>>>,
    hits: Arc<Hits>,
}

/// Responses say which worker answered, in an `x-worker` header (the body of `/config` is
/// exactly the payload).
type Answer<B> = (StatusCode, [(&'static str, String); 1], B);

fn answer_with<B>(status: StatusCode, body: B) -> Answer<B> {
    (status, [("x-worker", cluster::worker::id().unwrap_or(0).to_string())], body)
}

async fn get_config(State(state): State<AppState>) -> Answer<Bytes> {
    match state.config.lock().unwrap().clone() {
        Some(config) => answer_with(StatusCode::OK, config),
        None => answer_with(StatusCode::NOT_FOUND, Bytes::from_static(b"no config published yet\n")),
    }
}

async fn get_hits(State(state): State<AppState>) -> Answer<String> {
    match state.hits.incr().await {
        Ok(n) => answer_with(StatusCode::OK, format!("{n}\n")),
        Err(e) => answer_with(StatusCode::SERVICE_UNAVAILABLE, format!("redis unavailable: {e}\n")),
    }
}

/// The shared counter: one connection per worker, opened on first use and again after an
/// error (Redis restarted).
struct Hits {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl Hits {
    async fn incr(&self) -> redis::RedisResult<u64> {
        let (mut conn, cached) = self.connection().await?;
        let result = redis::cmd("INCR").arg(HITS_KEY).query_async(&mut conn).await;
        match result {
            // A connection from before a Redis restart fails once: retry on a new one.
            Err(e) if cached && (e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error()) => {
                *self.conn.lock().await = None;
                let (mut conn, _) = self.connection().await?;
                redis::cmd("INCR").arg(HITS_KEY).query_async(&mut conn).await
            }
            other => other,
        }
    }

    /// The worker's connection, and whether it was already open.
    async fn connection(&self) -> redis::RedisResult<(redis::aio::MultiplexedConnection, bool)> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok((conn.clone(), true));
        }
        let conn = self.client.get_multiplexed_async_connection().await?;
        *slot = Some(conn.clone());
        Ok((conn, false))
    }
}

/// Keeps `config` up to date: asks the agent for the current value until it answers, then
/// takes every update it broadcasts, until the worker stops.
async fn follow_config(config: Arc<Mutex<Option<Bytes>>>) {
    let ask = async {
        loop {
            match cluster::worker::request(Peer::Agent, ASK_CONFIG, Duration::from_secs(2)).await {
                Ok(answer) => return decode_config(answer),
                // No agent yet (or restarting): ask again shortly.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    };
    tokio::pin!(ask);
    let mut asked = false;
    loop {
        tokio::select! {
            current = &mut ask, if !asked => {
                asked = true;
                // An update that came while we asked is newer than the answer.
                let mut slot = config.lock().unwrap();
                if slot.is_none() {
                    *slot = current;
                }
            }
            msg = cluster::worker::recv() => {
                let Some(msg) = msg else { return };
                if msg.from == Peer::Agent && msg.request.is_none() {
                    *config.lock().unwrap() = Some(msg.data);
                }
            }
            // A stopping worker waits for the tasks it spawned: this one ends with it.
            _ = cluster::worker::shutdown() => return,
        }
    }
}

fn encode_config(config: &Option<Bytes>) -> Bytes {
    match config {
        Some(c) => [b"1".as_slice(), c].concat().into(),
        None => Bytes::from_static(b"0"),
    }
}

fn decode_config(answer: Bytes) -> Option<Bytes> {
    (answer.first() == Some(&b'1')).then(|| answer.slice(1..))
}

// ----- the agent -----

/// Subscribes to `cluster:config` (reconnecting with backoff) and hands every payload to the
/// workers; answers workers asking for the current value.
async fn agent() {
    let client = redis_client();
    let mut last: Option<Bytes> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        match subscribe(&client, &mut last).await {
            Ok(mut pubsub) => {
                println!("agent (pid {}): subscribed to {CHANNEL}", std::process::id());
                backoff = Duration::from_millis(100);
                let mut updates = pubsub.on_message();
                loop {
                    tokio::select! {
                        update = updates.next() => {
                            let Some(update) = update else { break };
                            let payload = Bytes::copy_from_slice(update.get_payload_bytes());
                            last = Some(payload.clone());
                            remember(&client, &payload).await;
                            // Fails only when no worker runs; starting workers ask for it.
                            let _ = cluster::worker::broadcast(payload).await;
                        }
                        msg = cluster::worker::recv() => match msg {
                            Some(msg) => answer(msg, &last).await,
                            None => return,
                        },
                        _ = cluster::worker::shutdown() => return,
                    }
                }
                println!("agent: lost the Redis subscription; reconnecting");
            }
            Err(e) => eprintln!("agent: cannot subscribe to {CHANNEL}: {e}; retrying in {backoff:?}"),
        }
        // Wait, still answering the workers from memory.
        let wait = tokio::time::sleep(backoff);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                msg = cluster::worker::recv() => match msg {
                    Some(msg) => answer(msg, &last).await,
                    None => return,
                },
                _ = cluster::worker::shutdown() => return,
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Connects, subscribes, and (first time only) recovers the last payload a previous agent saw.
async fn subscribe(client: &redis::Client, last: &mut Option<Bytes>) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(CHANNEL).await?;
    if last.is_none() {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let saved: Option<Vec<u8>> = redis::cmd("GET").arg(LAST_KEY).query_async(&mut conn).await?;
        *last = saved.map(Bytes::from);
    }
    Ok(pubsub)
}

async fn remember(client: &redis::Client, payload: &Bytes) {
    let saved = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("SET").arg(LAST_KEY).arg(payload.as_ref()).query_async::<()>(&mut conn).await
    };
    if let Err(e) = saved.await {
        eprintln!("agent: cannot save the last config: {e}");
    }
}

async fn answer(msg: cluster::messaging::Message, last: &Option<Bytes>) {
    if let Some(request) = &msg.request
        && msg.data[..] == *ASK_CONFIG
    {
        let _ = request.reply(encode_config(last)).await;
    }
}
