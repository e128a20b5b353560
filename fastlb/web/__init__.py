"""The status page the supervisor serves at ``GET /`` (``status.html``, read as package data)."""
