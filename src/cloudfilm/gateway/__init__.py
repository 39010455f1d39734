"""The front service (前置服务): pull exams from the hospital PACS and deliver them to the
archive from a durable queue (``cloudfilm gateway``; docs/gateway.md)."""
