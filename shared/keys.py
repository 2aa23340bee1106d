"""Every Redis stream and key name ragtune uses, defined once."""

REQUEST_PREFIX = "rag:req:"
REPLY_PREFIX = "rag:reply:"
INGEST = "rag:ingest"
EVENTS = "rag:events"
DEAD = "rag:dead"
ERRORS = "rag:errors"  # hash: "<stream>|<entry id>" -> last handler error, for dead letters
CANCEL_PREFIX = "rag:cancel:"  # a key per streamed request whose caller stopped listening
FEEDBACK = "rag:feedback"  # judged answers for continual learning; read by the trainer group

# Consumer groups, one per backend service; their replicas are the consumers.
EMBEDDING = "embedding"
SPARSE = "sparse"
RANKER = "ranker"
GENERATOR = "generator"
TRAINER = "trainer"
SERVICES = (EMBEDDING, SPARSE, RANKER, GENERATOR, TRAINER)
INGEST_GROUPS = (EMBEDDING, SPARSE)


def request_stream(service: str) -> str:
    """The stream a service's consumer group reads its requests from."""
    return f"{REQUEST_PREFIX}{service}"


def reply_stream(caller: str) -> str:
    """The private stream one caller (a front replica, the CLI) reads its replies from."""
    return f"{REPLY_PREFIX}{caller}"


def cancel_key(request_id: str) -> str:
    """Set (with a TTL) when the caller of a streamed request stops listening."""
    return f"{CANCEL_PREFIX}{request_id}"
