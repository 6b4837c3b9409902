//! `switchyard jobs`: the operations view of durable channels (per-channel figures, dead
//! letters listed, retried and purged), straight from Redis.

use std::io::Write;

use crate::layer::{Layer, LayerError, RedisLayer};
use anyhow::Context;
use clap::{Args, Subcommand};

use super::cli::LayerArgs;

/// `switchyard jobs`
#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub layer: LayerArgs,
    #[command(subcommand)]
    pub command: JobsCommand,
}

/// What `switchyard jobs` does.
#[derive(Debug, Clone, Subcommand)]
pub enum JobsCommand {
    /// Per durable channel: pending, in progress, scheduled retries, dead letters, oldest age.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Dead letters: list, retry, purge.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
}

/// `switchyard jobs dead …`
#[derive(Debug, Clone, Subcommand)]
pub enum DeadCommand {
    /// Lists dead letters (every durable channel, or one), oldest first.
    List {
        /// Only this channel.
        channel: Option<String>,
        /// Most letters per channel.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Puts dead letters back on their channel as fresh jobs (attempts from zero, same job id).
    Retry {
        /// The durable channel.
        channel: String,
        /// The dead letter's id (as `dead list` shows it).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every dead letter of the channel.
        #[arg(long)]
        all: bool,
    },
    /// Deletes dead letters (every durable channel, or one).
    Purge {
        /// Only this channel.
        channel: Option<String>,
    },
}

async fn redis(args: &LayerArgs) -> anyhow::Result<RedisLayer> {
    match args.open("redis://127.0.0.1:6379/0").await? {
        Layer::Redis(r) => Ok(r),
        Layer::Memory(_) => Err(LayerError::Config(
            "`switchyard jobs` needs a Redis layer: durable channels live in Redis streams".into(),
        )
        .into()),
    }
}

async fn channels_or(layer: &RedisLayer, one: Option<String>) -> anyhow::Result<Vec<String>> {
    match one {
        Some(c) => {
            crate::names::validate_channel(&c).map_err(LayerError::from)?;
            Ok(vec![c])
        }
        None => Ok(layer.job_channels().await?),
    }
}

/// Runs `switchyard jobs …`.
pub async fn run(args: JobsArgs) -> anyhow::Result<()> {
    let layer = redis(&args.layer).await?;
    let mut out = std::io::stdout().lock();
    match args.command {
        JobsCommand::Stats { json } => {
            let mut all = Vec::new();
            for c in layer.job_channels().await? {
                all.push(layer.job_stats(&c).await?);
            }
            if json {
                writeln!(out, "{}", serde_json::to_string(&all)?)?;
                return Ok(());
            }
            let width = all
                .iter()
                .map(|s| s.channel.len())
                .chain([7])
                .max()
                .unwrap_or(7);
            writeln!(
                out,
                "{:<width$}  {:>8}  {:>11}  {:>7}  {:>6}  OLDEST",
                "CHANNEL", "PENDING", "IN_PROGRESS", "RETRIES", "DEAD"
            )?;
            for s in &all {
                writeln!(
                    out,
                    "{:<width$}  {:>8}  {:>11}  {:>7}  {:>6}  {:.1}s",
                    s.channel,
                    s.pending,
                    s.in_progress,
                    s.scheduled_retries,
                    s.dead,
                    s.oldest_age_ms as f64 / 1000.0
                )?;
            }
            if all.is_empty() {
                writeln!(out, "(no durable channels with jobs under this prefix)")?;
            }
        }
        JobsCommand::Dead { command } => match command {
            DeadCommand::List {
                channel,
                limit,
                json,
            } => {
                let mut any = false;
                for c in channels_or(&layer, channel).await? {
                    for d in layer.dead_list(&c, limit).await? {
                        any = true;
                        if json {
                            writeln!(out, "{}", serde_json::to_string(&d)?)?;
                        } else {
                            writeln!(
                                out,
                                "{} {} job={} attempts={} error={:?} message={}",
                                d.channel, d.entry_id, d.job_id, d.attempts, d.error, d.message
                            )?;
                        }
                    }
                }
                if !any && !json {
                    writeln!(out, "(no dead letters)")?;
                }
            }
            DeadCommand::Retry { channel, id, all } => {
                crate::names::validate_channel(&channel).map_err(LayerError::from)?;
                let id = if all { None } else { id };
                let n = layer
                    .dead_retry(&channel, id.as_deref())
                    .await
                    .with_context(|| format!("cannot retry dead letters of {channel}"))?;
                if n == 0
                    && let Some(id) = &id
                {
                    anyhow::bail!(LayerError::Config(format!(
                        "no dead letter {id} on {channel} (see `switchyard jobs dead list {channel}`)"
                    )));
                }
                writeln!(out, "requeued {n} dead letter(s) on {channel}")?;
            }
            DeadCommand::Purge { channel } => {
                let mut total = 0;
                for c in channels_or(&layer, channel).await? {
                    total += layer.dead_purge(&c).await?;
                }
                writeln!(out, "purged {total} dead letter(s)")?;
            }
        },
    }
    Ok(())
}
