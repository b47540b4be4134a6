"""enjambre's wire protocol, sans-I/O: bytes <-> frames <-> typed messages, and the decisions on them.

Nothing here touches sockets, asyncio or JAX (a test enforces it); the I/O side is
node/net/ and node/dht/. Import the modules themselves (``protocol.codec``,
``protocol.framing``, ``protocol.messages``, ``protocol.handshake``, ``protocol.ids``,
``protocol.records``, ``protocol.seal``, ``protocol.dht``, ``protocol.beacon``): this
face imports nothing, so a light module such as ``protocol.ids`` does not pull in the
codec's numpy and ml_dtypes (0.7 s at every ``nodectl`` call).
"""
