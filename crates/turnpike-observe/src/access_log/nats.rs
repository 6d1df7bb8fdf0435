//! Publishes each record to a NATS subject (core NATS; a JetStream stream bound to the
//! subject stores them). A flush after each group confirms the server has them.

use std::sync::Arc;

use turnpike_model::observe::access_log::NatsSink;

use super::format::Formatter;
use super::worker::Deliver;
use crate::CallEvent;

pub(crate) struct NatsWriter {
    url: String,
    subject: String,
    client: Option<async_nats::Client>,
}

impl NatsWriter {
    pub(crate) fn new(cfg: &NatsSink) -> Self {
        Self {
            url: cfg.url.clone(),
            subject: cfg.subject.clone(),
            client: None,
        }
    }
}

impl Deliver for NatsWriter {
    async fn deliver(&mut self, events: &[Arc<CallEvent>], fmt: &Formatter) -> Result<(), String> {
        let client = match &self.client {
            Some(c) => c.clone(),
            None => {
                let c = async_nats::connect(self.url.as_str())
                    .await
                    .map_err(|e| format!("nats connect {}: {e}", self.url))?;
                self.client = Some(c.clone());
                c
            }
        };
        for e in events {
            client
                .publish(self.subject.clone(), fmt.line(e).into())
                .await
                .map_err(|e| format!("nats publish: {e}"))?;
        }
        client.flush().await.map_err(|e| format!("nats flush: {e}"))
    }
}
