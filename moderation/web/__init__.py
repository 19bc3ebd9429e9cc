"""The reviewers' web pages: server-rendered, behind the same keys as the API."""
