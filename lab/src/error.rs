//! The demo engine's error: the subsystem's own, or an execution's state refusing an operation
//! (a state the subsystem knows nothing of).

/// What a demo engine operation can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The subsystem's error: connecting, installing the schema, the database or server.
    #[error(transparent)]
    Subsystem(#[from] ff_completions::Error),
    /// The execution's state refused the operation (not running, unknown, already exists).
    #[error("the execution's state refused it: {detail}")]
    State {
        /// What the conflict was.
        detail: String,
    },
}

impl Error {
    /// A [`ff_completions::Error::Validation`] with the given text.
    pub fn validation(detail: impl Into<String>) -> Self {
        Self::Subsystem(ff_completions::Error::validation(detail))
    }

    /// An sqlx error of operation `op`: a refusal of the demo's own functions or constraints
    /// (`P0001`, a data or constraint error) is [`Error::State`]; the rest as the subsystem
    /// maps it.
    pub fn from_sqlx(op: &'static str, err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if code == "P0001" || code.starts_with("22") || code.starts_with("23") {
                return Self::State { detail: format!("{op}: {}", db.message()) };
            }
        }
        Self::Subsystem(ff_completions::Error::from_sqlx(op, err))
    }

    /// Whether it is the subsystem's error `kind` (e.g. `matches!(e, Validation { .. })`).
    pub fn subsystem(&self) -> Option<&ff_completions::Error> {
        match self {
            Self::Subsystem(err) => Some(err),
            Self::State { .. } => None,
        }
    }
}
