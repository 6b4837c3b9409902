//! The `serve`/`dev` flags for authentication at the edge and TLS termination, turned into the
//! server's [`AuthConfig`] and [`TlsConfig`] (key files are read here, once, at start).

use std::path::PathBuf;
use std::time::Duration;

use crate::server::{AuthConfig, JwtConfig, JwtKey, TlsConfig};
use anyhow::Context;
use clap::{Args, ValueEnum};

/// Which signature a JWT must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with --jwt-secret.
    #[value(name = "HS256")]
    Hs256,
    /// RSA PKCS#1 v1.5 SHA-256 with --jwt-public-key.
    #[value(name = "RS256")]
    Rs256,
    /// ECDSA P-256 SHA-256 with --jwt-public-key.
    #[value(name = "ES256")]
    Es256,
}

/// Edge authentication and TLS flags.
#[derive(Debug, Clone, Args)]
pub struct EdgeArgs {
    /// Verify JWTs signed with this HS256 secret (Authorization: Bearer, a `bearer.<token>`
    /// WebSocket subprotocol, or ?token=); the claims reach consumers under `user`.
    #[arg(
        long,
        env = "SWITCHYARD_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "jwt_public_key"
    )]
    pub jwt_secret: Option<String>,
    /// Verify JWTs with this public key (PEM file): RS256 by default, ES256 with --jwt-algorithm.
    #[arg(long, env = "SWITCHYARD_JWT_PUBLIC_KEY", value_name = "FILE")]
    pub jwt_public_key: Option<PathBuf>,
    /// The one algorithm accepted (default: HS256 with a secret, RS256 with a public key).
    #[arg(long, env = "SWITCHYARD_JWT_ALGORITHM", value_enum)]
    pub jwt_algorithm: Option<JwtAlgorithm>,
    /// Claims passed on under `user` besides `sub`, comma-separated (e.g. name,email).
    #[arg(long, env = "SWITCHYARD_JWT_CLAIMS", value_delimiter = ',')]
    pub jwt_claims: Vec<String>,
    /// Seconds of clock skew allowed on exp/nbf (a socket closes at exp + this).
    #[arg(long, env = "SWITCHYARD_JWT_LEEWAY", default_value_t = 5)]
    pub jwt_leeway: u64,
    /// Required `aud` claim.
    #[arg(long, env = "SWITCHYARD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss` claim.
    #[arg(long, env = "SWITCHYARD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Path globs where a request or socket without a valid token is refused at the edge (401 /
    /// 403), comma-separated, e.g. "/ws/private/*,/api/*".
    #[arg(long, env = "SWITCHYARD_AUTH_REQUIRED_PATHS", value_delimiter = ',')]
    pub auth_required_paths: Vec<String>,
    /// Close code (4000-4999) for a socket whose token expires while it is open.
    #[arg(long, default_value_t = crate::server::TOKEN_EXPIRED_CLOSE)]
    pub auth_expired_close_code: u16,
    /// Token refresh: a text frame starting with this prefix carries a new token for its
    /// socket (the rest of the frame), taken by the server (no worker sees it); a valid one for
    /// the same sub keeps the socket open past the old expiry, any other closes it. Off by default.
    #[arg(long, env = "SWITCHYARD_AUTH_REFRESH_PREFIX")]
    pub auth_refresh_prefix: Option<String>,
    /// Bearer token that /healthz and /metrics require (Authorization: Bearer <token>).
    #[arg(long, env = "SWITCHYARD_OPS_TOKEN", hide_env_values = true)]
    pub ops_token: Option<String>,
    /// Serve HTTPS and WSS with this certificate chain (PEM); needs --tls-key. Reloaded on SIGHUP.
    #[arg(
        long,
        env = "SWITCHYARD_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(
        long,
        env = "SWITCHYARD_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
}

impl EdgeArgs {
    /// The authentication settings these flags describe.
    pub fn auth(&self) -> anyhow::Result<AuthConfig> {
        let key = match (&self.jwt_secret, &self.jwt_public_key, self.jwt_algorithm) {
            (None, None, None) => None,
            (None, None, Some(_)) => {
                anyhow::bail!("--jwt-algorithm needs --jwt-secret or --jwt-public-key")
            }
            (Some(secret), None, None | Some(JwtAlgorithm::Hs256)) => {
                Some(JwtKey::Secret(secret.as_bytes().to_vec()))
            }
            (Some(_), None, Some(_)) => anyhow::bail!("--jwt-secret is for HS256 only"),
            (None, Some(path), algorithm) => {
                let pem = std::fs::read(path).with_context(|| {
                    format!("cannot read the JWT public key {}", path.display())
                })?;
                Some(match algorithm {
                    None | Some(JwtAlgorithm::Rs256) => JwtKey::RsaPem(pem),
                    Some(JwtAlgorithm::Es256) => JwtKey::EcPem(pem),
                    Some(JwtAlgorithm::Hs256) => {
                        anyhow::bail!("HS256 takes --jwt-secret, not a public key")
                    }
                })
            }
            (Some(_), Some(_), _) => {
                anyhow::bail!("give --jwt-secret or --jwt-public-key, not both")
            }
        };
        Ok(AuthConfig {
            jwt: key.map(|key| JwtConfig {
                key,
                claims: self
                    .jwt_claims
                    .iter()
                    .map(|c| c.trim().to_owned())
                    .filter(|c| !c.is_empty())
                    .collect(),
                leeway: Duration::from_secs(self.jwt_leeway),
                audience: self.jwt_audience.clone(),
                issuer: self.jwt_issuer.clone(),
            }),
            required_paths: self
                .auth_required_paths
                .iter()
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
            ops_token: self.ops_token.clone(),
            expired_close_code: Some(self.auth_expired_close_code),
            refresh_prefix: self.auth_refresh_prefix.clone(),
        })
    }

    /// The TLS settings, when both files are given.
    pub fn tls(&self) -> Option<TlsConfig> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsConfig {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }
}
