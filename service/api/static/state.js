// The page's shared state: the token (in memory only), the chosen endpoint, the photo, the view.

export const state = {
  token: "", // the access token: in this page's memory only, never stored
  endpoints: [],
  name: null, // the chosen endpoint
  info: null, // its status (GET /endpoints)
  photo: null, // the query photo (a File or Blob)
  view: null, // {kind: "photo"} or {kind: "similar", item}
  labels: new Set(), // chosen label chips
  fields: new Set(), // metadata fields seen in results (suggested in the filter's field box)
  item: null, // the item shown in the dialog
  kTouched: false,
  searchSeq: 0,
  jobSeq: 0,
  blobs: [], // blob: URLs of the grid's images (revoked when the grid is drawn again)
  previewUrl: null,
};
