-- Deletes one record whatever its state (an operator's removal).
DELETE FROM records WHERE id = ?1
