//! `XADD` to a Redis stream, trimmed with `MAXLEN ~ N`; each entry has one field, `event`,
//! holding the JSON record.

use std::sync::Arc;

use redis::aio::ConnectionManager;
use turnpike_model::observe::access_log::RedisSink;

use super::format::Formatter;
use super::worker::Deliver;
use crate::CallEvent;

pub(crate) struct RedisWriter {
    client: redis::Client,
    conn: Option<ConnectionManager>,
    stream: String,
    max_len: u64,
}

impl RedisWriter {
    pub(crate) fn new(cfg: &RedisSink) -> Result<Self, String> {
        Ok(Self {
            client: redis::Client::open(cfg.url.as_str()).map_err(|e| format!("url: {e}"))?,
            conn: None,
            stream: cfg.stream.clone(),
            max_len: cfg.max_len,
        })
    }
}

impl Deliver for RedisWriter {
    async fn deliver(&mut self, events: &[Arc<CallEvent>], fmt: &Formatter) -> Result<(), String> {
        if self.conn.is_none() {
            let c = ConnectionManager::new(self.client.clone())
                .await
                .map_err(|e| format!("redis connect: {e}"))?;
            self.conn = Some(c);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err("redis: not connected".into());
        };
        let mut pipe = redis::pipe();
        for e in events {
            pipe.cmd("XADD")
                .arg(&self.stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.max_len)
                .arg("*")
                .arg("event")
                .arg(fmt.line(e))
                .ignore();
        }
        pipe.query_async::<()>(conn)
            .await
            .map_err(|e| format!("redis XADD: {e}"))
    }
}
