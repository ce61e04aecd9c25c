"""The backend server: protocol.py (the wire format, shared with the Blender add-on); the server, jobs, client and
broker build on it."""
