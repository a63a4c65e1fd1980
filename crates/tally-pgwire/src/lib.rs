//! The Postgres wire protocol in front of Tally's SQL (`[pgwire] listen`):
//! `psql`, drivers and BI tools run the same tenant-scoped, read-only
//! DataFusion queries as `POST /api/v1/query`, with the same limits (time,
//! memory, rows), through [`tally_query::QueryEngine`].
//!
//! - **Who is asking.** Open mode (no API keys): the tenant is the user
//!   name of the connection (`psql -U acme`), `default` without one. Keyed
//!   mode: the server asks for a cleartext password, which must be an API
//!   key with the `read` scope; the key's tenant is the session's, whatever
//!   user name was given. Keys are looked up by digest, as over HTTP.
//! - **Simple and extended queries.** A simple query may hold several
//!   statements; extended queries bind `$n` parameters (text format for any
//!   type, binary for the common scalar types) as SQL literals in the
//!   parsed statement, so a parameter is always a value, never SQL.
//! - **Session statements** drivers send (`SET`, `RESET`, `DISCARD`,
//!   `BEGIN`/`COMMIT`/`ROLLBACK`, `SHOW <setting>`) are answered here:
//!   the data is read-only, so transactions are empty brackets.
//!   `SHOW TABLES` and `information_schema` list the tenant's own tables.
//! - **Types.** Arrow columns map to the nearest Postgres type (integers
//!   by width, `float8`, `text`, `bool`, `bytea`, `timestamptz`, `date`);
//!   anything else is sent as its text form typed `text`.
//! - **Limits.** `max-connections` sessions at once (SQLSTATE 53300 past
//!   it); an answer is cut at `query.max-rows` like over HTTP.

mod encode;
mod params;

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use futures::{Sink, SinkExt};
use pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    DescribePortalResponse, DescribeStatementResponse, FieldInfo, QueryResponse, Response, Tag,
};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, METADATA_APPLICATION_NAME, METADATA_USER, PgWireConnectionState,
    PgWireServerHandlers, PidSecretKeyGenerator, RandomPidSecretKeyGenerator, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tally_query::{QueryEngine, QueryError};
use tally_runtime::keys::{Keys, Scope, digest};
use tally_types::{DEFAULT_TENANT, valid_tenant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// Where a session's tenant is kept among the connection's metadata.
const METADATA_TENANT: &str = "tally.tenant";

/// The protocol's server for one node.
pub struct PgServer {
    backend: Arc<Backend>,
    max_connections: usize,
}

impl PgServer {
    pub fn new(engine: Arc<QueryEngine>, keys: Arc<Keys>, max_connections: usize) -> PgServer {
        let mut params = DefaultServerParameterProvider::default();
        params.server_version = server_version();
        params.is_superuser = false;
        params.default_transaction_read_only = true;
        PgServer {
            backend: Arc::new(Backend {
                engine,
                keys,
                params,
                pids: RandomPidSecretKeyGenerator::default(),
                parser: Arc::new(SqlParser),
            }),
            max_connections: max_connections.max(1),
        }
    }

    /// Accepts sessions on `listener` until `stopped` turns true.
    pub async fn serve(
        self,
        listener: TcpListener,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) {
        let slots = Arc::new(tokio::sync::Semaphore::new(self.max_connections));
        let handlers = Arc::new(Handlers(self.backend));
        loop {
            let (mut socket, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "pgwire: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stopped.changed() => return,
            };
            let _ = socket.set_nodelay(true);
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, max = self.max_connections, "pgwire: too many sessions; refused");
                tokio::spawn(async move {
                    let msg = too_many(self.max_connections);
                    let _ = socket.write_all(&msg).await;
                    let _ = socket.shutdown().await;
                });
                continue;
            };
            let handlers = handlers.clone();
            tokio::spawn(async move {
                if let Err(e) = pgwire::tokio::process_socket(socket, None, handlers).await {
                    tracing::debug!(%peer, error = %e, "pgwire: session ended with an error");
                }
                drop(permit);
            });
        }
    }
}

/// A FATAL `ErrorResponse` (SQLSTATE 53300) written before any startup
/// exchange: libpq reports it as the connection's error.
fn too_many(max: usize) -> Vec<u8> {
    use pgwire::messages::Message;
    let info = ErrorInfo::new(
        "FATAL".into(),
        "53300".into(),
        format!(
            "too many Postgres sessions ({max} open); close one or raise pgwire.max-connections"
        ),
    );
    let mut buf = bytes::BytesMut::new();
    // Encoding a message into memory cannot fail.
    let _ = ErrorResponse::from(info).encode(&mut buf);
    buf.to_vec()
}

struct Handlers(Arc<Backend>);

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.0.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.0.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.0.clone()
    }
}

struct Backend {
    engine: Arc<QueryEngine>,
    keys: Arc<Keys>,
    params: DefaultServerParameterProvider,
    pids: RandomPidSecretKeyGenerator,
    parser: Arc<SqlParser>,
}

fn user_error(code: &str, message: impl Into<String>, hint: Option<&str>) -> PgWireError {
    let mut e = ErrorInfo::new("ERROR".into(), code.into(), message.into());
    e.hint = hint.map(str::to_string);
    PgWireError::UserError(Box::new(e))
}

fn fatal(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".into(),
        code.into(),
        message.into(),
    )))
}

/// A query error as Postgres reports its kind (SQLSTATE), with the same
/// message the HTTP API gives.
fn query_error(e: QueryError) -> PgWireError {
    let code = match &e {
        QueryError::Sql(_) | QueryError::BadRequest(_) => "42601",
        QueryError::Timeout(_) => "57014",
        QueryError::Memory { .. } => "53200",
        QueryError::Exec(_) => "XX000",
    };
    user_error(code, e.to_string(), None)
}

impl Backend {
    /// Ends the startup exchange for `tenant`.
    async fn admit<C>(&self, client: &mut C, tenant: String) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        client
            .metadata_mut()
            .insert(METADATA_TENANT.to_string(), tenant);
        let (pid, secret) = self.pids.generate(client);
        client.set_pid_and_secret_key(pid, secret);
        finish_authentication(client, &self.params).await
    }

    /// Runs one statement for `tenant`: a session statement is answered
    /// here, anything else by the query engine.
    async fn run(
        &self,
        tenant: &str,
        sql: &str,
        format: &Format,
        app: Option<&str>,
    ) -> PgWireResult<Response> {
        if let Some(l) = Local::parse(sql, app) {
            return l.respond();
        }
        let r = self.engine.sql(tenant, sql).await.map_err(query_error)?;
        if r.truncated {
            tracing::debug!(
                tenant,
                rows = r.rows,
                "pgwire: answer cut at query.max-rows"
            );
        }
        let fields = Arc::new(encode::fields(&r.schema, format));
        let rows = encode::rows(&r.batches, &fields)?;
        Ok(Response::Query(QueryResponse::new(
            fields,
            futures::stream::iter(rows),
        )))
    }

    /// The columns of `sql`'s answer (and its parameters' types), planned
    /// without running it.
    async fn describe(
        &self,
        tenant: &str,
        sql: &str,
        format: &Format,
    ) -> PgWireResult<(Vec<Type>, Vec<FieldInfo>)> {
        if let Some(l) = Local::parse(sql, None) {
            return Ok((Vec::new(), l.fields()));
        }
        let (schema, params) = self
            .engine
            .describe(tenant, sql)
            .await
            .map_err(query_error)?;
        let params = params
            .iter()
            .map(|t| t.as_ref().map_or(Type::TEXT, encode::pg_type))
            .collect();
        Ok((params, encode::fields(&schema, format)))
    }
}

fn tenant_of<C: ClientInfo>(client: &C) -> PgWireResult<String> {
    client
        .metadata()
        .get(METADATA_TENANT)
        .cloned()
        .ok_or_else(|| fatal("28000", "the session has no tenant: authenticate first"))
}

#[async_trait]
impl StartupHandler for Backend {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                if self.keys.keyed() {
                    client.set_state(PgWireConnectionState::AuthenticationInProgress);
                    client
                        .send(PgWireBackendMessage::Authentication(
                            Authentication::CleartextPassword,
                        ))
                        .await?;
                    return Ok(());
                }
                let user = client
                    .metadata()
                    .get(METADATA_USER)
                    .map(|u| u.trim().to_string())
                    .filter(|u| !u.is_empty())
                    .unwrap_or_else(|| DEFAULT_TENANT.to_string());
                if !valid_tenant(&user) {
                    return Err(fatal(
                        "28000",
                        format!(
                            "user {user:?} is not a tenant name (letters, digits, '_' and '-', up to 64): in open mode the user name is the tenant, e.g. psql -U acme"
                        ),
                    ));
                }
                self.admit(client, user).await
            }
            PgWireFrontendMessage::PasswordMessageFamily(p) => {
                let password = p.into_password()?.password;
                let Some(key) = self.keys.get(&digest(password.trim())) else {
                    return Err(fatal(
                        "28P01",
                        "password authentication failed: the password must be a Tally API key with the read scope",
                    ));
                };
                if !key.allows(Scope::Read) {
                    return Err(fatal(
                        "28000",
                        format!(
                            "API key {:?} has no read scope: SQL needs a key with scope \"read\" or \"admin\"",
                            key.name()
                        ),
                    ));
                }
                let tenant = key.tenant().to_string();
                self.admit(client, tenant).await
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl SimpleQueryHandler for Backend {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let tenant = tenant_of(client)?;
        let app = client.metadata().get(METADATA_APPLICATION_NAME).cloned();
        let mut out = Vec::new();
        for sql in params::split(query) {
            match self
                .run(&tenant, &sql, &Format::UnifiedText, app.as_deref())
                .await
            {
                Ok(r) => out.push(r),
                Err(e) if out.is_empty() => return Err(e),
                Err(PgWireError::UserError(info)) => {
                    out.push(Response::Error(info));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

/// Statements are kept as their text; parameters are bound at execution.
#[derive(Debug, Default)]
struct SqlParser;

#[async_trait]
impl QueryParser for SqlParser {
    type Statement = String;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<String>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        Ok(Some(sql.to_string()))
    }

    fn get_parameter_types(&self, _stmt: &String) -> PgWireResult<Vec<Type>> {
        Ok(Vec::new())
    }

    fn get_result_schema(
        &self,
        _stmt: &String,
        _column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        Ok(Vec::new())
    }
}

#[async_trait]
impl ExtendedQueryHandler for Backend {
    type Statement = String;
    type QueryParser = SqlParser;

    fn query_parser(&self) -> Arc<SqlParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<String>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = String>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let tenant = tenant_of(client)?;
        let app = client.metadata().get(METADATA_APPLICATION_NAME).cloned();
        let sql = params::bind(portal)?;
        self.run(&tenant, &sql, &portal.result_column_format, app.as_deref())
            .await
    }

    async fn do_describe_statement<C>(
        &self,
        client: &mut C,
        stmt: &StoredStatement<String>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = String>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let tenant = tenant_of(client)?;
        let (server, fields) = self
            .describe(&tenant, &stmt.statement, &Format::UnifiedText)
            .await?;
        // The client's declared types win; the planner's fill the rest.
        let n = stmt.parameter_types.len().max(server.len());
        let params = (0..n)
            .map(|i| {
                stmt.parameter_types
                    .get(i)
                    .cloned()
                    .flatten()
                    .filter(|t| *t != Type::UNKNOWN)
                    .or_else(|| server.get(i).cloned())
                    .unwrap_or(Type::TEXT)
            })
            .collect();
        Ok(DescribeStatementResponse::new(params, fields))
    }

    async fn do_describe_portal<C>(
        &self,
        client: &mut C,
        portal: &Portal<String>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = String>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let tenant = tenant_of(client)?;
        let sql = params::bind(portal)?;
        let (_, fields) = self
            .describe(&tenant, &sql, &portal.result_column_format)
            .await?;
        Ok(DescribePortalResponse::new(fields))
    }
}

/// What this server reports as its version (Postgres 16 behaviour).
fn server_version() -> String {
    format!("16.6 (Tally {})", env!("CARGO_PKG_VERSION"))
}

/// Settings `SHOW` answers here (Postgres' own names, lower case), as
/// drivers and tools ask for them when they connect.
fn setting(name: &str, app: Option<&str>) -> Option<String> {
    let v = match name {
        "transaction_isolation"
        | "transaction isolation level"
        | "default_transaction_isolation" => "read committed",
        "transaction_read_only" | "default_transaction_read_only" => "on",
        "standard_conforming_strings" | "integer_datetimes" => "on",
        "client_encoding" | "server_encoding" => "UTF8",
        "datestyle" => "ISO, YMD",
        "intervalstyle" => "postgres",
        "timezone" => "UTC",
        "search_path" => "public",
        "max_identifier_length" => "63",
        "lc_collate" | "lc_ctype" => "C",
        "is_superuser" => "off",
        "server_version_num" => "160006",
        "server_version" => return Some(server_version()),
        "application_name" => app.unwrap_or_default(),
        _ => return None,
    };
    Some(v.to_string())
}

/// A session statement drivers send, answered without the engine (`SHOW
/// TABLES` and unknown settings go to the engine).
enum Local {
    /// `SET`, `RESET`, `DISCARD`: accepted; the session has nothing to change.
    Command(&'static str),
    /// `BEGIN`/`START`: the data is read-only, so transactions are empty brackets.
    Begin,
    /// `COMMIT`/`END` or `ROLLBACK`/`ABORT`.
    End(&'static str),
    /// `SHOW <setting>`: its name and value.
    Show(String, String),
}

impl Local {
    fn parse(sql: &str, app: Option<&str>) -> Option<Local> {
        let text = sql.trim().trim_end_matches(';').trim();
        let mut words = text.split_whitespace();
        let first = words.next().unwrap_or_default().to_ascii_uppercase();
        Some(match first.as_str() {
            "SET" => Local::Command("SET"),
            "RESET" => Local::Command("RESET"),
            "DISCARD" => Local::Command("DISCARD ALL"),
            "BEGIN" | "START" => Local::Begin,
            "COMMIT" | "END" => Local::End("COMMIT"),
            "ROLLBACK" | "ABORT" => Local::End("ROLLBACK"),
            "SHOW" => {
                let name = words
                    .collect::<Vec<_>>()
                    .join(" ")
                    .trim_matches('"')
                    .to_ascii_lowercase();
                let value = setting(&name, app)?;
                Local::Show(name, value)
            }
            _ => return None,
        })
    }

    /// The columns of its answer.
    fn fields(&self) -> Vec<FieldInfo> {
        match self {
            Local::Show(name, _) => vec![FieldInfo::new(
                name.clone(),
                None,
                None,
                Type::TEXT,
                pgwire::api::results::FieldFormat::Text,
            )],
            _ => Vec::new(),
        }
    }

    fn respond(self) -> PgWireResult<Response> {
        Ok(match self {
            Local::Command(tag) => Response::Execution(Tag::new(tag)),
            Local::Begin => Response::TransactionStart(Tag::new("BEGIN")),
            Local::End(tag) => Response::TransactionEnd(Tag::new(tag)),
            Local::Show(_, ref value) => {
                let fields = Arc::new(self.fields());
                let mut enc = pgwire::api::results::DataRowEncoder::new(fields.clone());
                enc.encode_field(value)?;
                let row = enc.take_row();
                Response::Query(QueryResponse::new(
                    fields,
                    futures::stream::iter(vec![Ok(row)]),
                ))
            }
        })
    }
}
