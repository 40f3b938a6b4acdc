-- What an opened file is: its application id, schema version and number of schema objects.
SELECT application_id, user_version, (SELECT count(*) FROM sqlite_schema)
FROM pragma_application_id(), pragma_user_version()
